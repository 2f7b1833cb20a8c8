"""Where each serving rule comes from: the consumer's file at the commit it was read at."""

from __future__ import annotations

VLLM_FP8_UTILS = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/utils/fp8_utils.py "
    "@007d50058a06dec0f82472d63c819244d460c40d (validate_fp8_block_shape, requant_weight_ue8m0_inplace)"
)
VLLM_FP8_MOE = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/fp8.py "
    "@0071b24bf8fe8c3d1bc3516d0ff8477f07964aaf (Fp8MoEMethod.create_weights)"
)
VLLM_LINEAR = (
    "vllm-project/vllm vllm/model_executor/layers/linear.py @9e109c9887e38c51fc16b0da89760c5bd7c293c9 "
    "(ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, divide)"
)
VLLM_DEEP_GEMM = (
    "vllm-project/vllm vllm/utils/deep_gemm.py @00620f91ea186ca295a1eb69f4acba9d0efaaaaa "
    "(per_block_cast_to_fp8, should_use_deepgemm_for_fp8_linear)"
)
SGLANG_FP8_UTILS = (
    "sgl-project/sglang python/sglang/srt/layers/quantization/fp8_utils.py "
    "@002ed7e465ec774f9332987798b855eb73d5e830 (validate_fp8_block_shape)"
)
SGLANG_FP8_MOE = (
    "sgl-project/sglang python/sglang/srt/layers/quantization/fp8.py "
    "@d94a1535900da43cb374c2445679375e78935af6 (Fp8MoEMethod.create_weights)"
)
SGLANG_FUSED_MOE = (
    "sgl-project/sglang python/sglang/srt/layers/moe/fused_moe_triton/layer.py "
    "@9af3c47b70fa13269891063624d658bb1be1b6b9 (FusedMoE: num_experts % moe_ep_size)"
)
DEEPGEMM_MATH = (
    "deepseek-ai/DeepGEMM deep_gemm/utils/math.py @54e22612409371d6364144b69086735beb54e98b "
    "(ceil_to_ue8m0, per_block_cast_to_fp8)"
)
TRANSFORMERS_FP8 = (
    "transformers 5.24 integrations/finegrained_fp8.py (Fp8Dequantize._dequantize_one), installed"
)
TRANSFORMERS_FP8_QUANTIZER = "transformers 5.24 quantizers/quantizer_finegrained_fp8.py, installed"
COMPRESSED_TENSORS = "compressed-tensors 0.20.1 quantization/quant_config.py (QuantizationConfig), installed"
VLLM_QUANT_UTILS = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/utils/quant_utils.py "
    "@4de0dd6db70fbcfdb5420b3de5892d06ed1624c8 (is_layer_skipped)"
)
VLLM_MODEL_CONFIG = "vllm-project/vllm vllm/config (ModelConfig.verify_with_parallel_config)"
VLLM_FP8_CONFIG = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/fp8.py "
    "@0071b24bf8fe8c3d1bc3516d0ff8477f07964aaf (Fp8Config.from_config, Fp8Config.get_quant_method)"
)
SGLANG_FP8_KERNEL = (
    "sgl-project/sglang python/sglang/srt/layers/quantization/fp8_kernel.py "
    "(per_token_group_quant_fp8: x.shape[-1] % group_size == 0)"
)
