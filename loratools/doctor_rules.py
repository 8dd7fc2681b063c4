"""The rules ``loratools doctor`` checks, as data: one table per target.

Each :class:`Rule` names a check function of :mod:`loratools.doctor` (``check``) with its parameters, the severity
(``error``: the target refuses the adapter or computes something else; ``warning``: it may, depending on the
engine version or the model; ``info``: a setting you need), the message and fix shown to the user, the engine
version the fact holds for, and where the fact comes from (the engine's own code or docs, pinned to the commit that
was read where one was). Messages may use ``{n}`` (number of modules), ``{example}`` and any key a check returns.

Nothing here imports torch: the table is plain data, and tests check every rule names an existing check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TARGETS = ("vllm", "sglang", "llama.cpp", "tensorrt-llm", "peft", "diffusers", "comfyui")
SEVERITIES = ("error", "warning", "info")

#: vLLM's allowed ``--max-lora-rank`` values: ``MaxLoRARanks`` in vllm/config/lora.py
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: the natural output format of ``doctor --fix`` per target (None: keep the adapter's format)
NATURAL_FORMAT = {"vllm": "peft", "sglang": "peft", "llama.cpp": "peft", "tensorrt-llm": "peft", "peft": "peft",
                  "diffusers": None, "comfyui": None}

VLLM_LORA_CONFIG = ("https://github.com/vllm-project/vllm/blob/01230b40128e570a58e54e75f7e55c4d5cd9246d/"
                    "vllm/config/lora.py (MaxLoRARanks)")
VLLM_PEFT_HELPER = "https://github.com/vllm-project/vllm/blob/main/vllm/lora/peft_helper.py (_validate_features, validate_legal)"
VLLM_PEFT_HELPER_OLD = ("https://github.com/vllm-project/vllm/blob/02143692ba86a7ba6198a67e12982c5317c8bd2f/"
                        "vllm/lora/peft_helper.py (PEFTHelper reads r and lora_alpha only)")
VLLM_LORA_MODEL = ("https://github.com/vllm-project/vllm/blob/0306474e9d1f26d8717aad457b9511f0c9e57d60/"
                   "vllm/lora/lora_model.py (from_lora_tensors: DoRA magnitude refused, embedding vocab size; "
                   "check_unexpected_modules)")
SGLANG_CONFIG = ("https://github.com/sgl-project/sglang/blob/0ceb81fe4868b3364267a661da67b5d88aa45fc3/"
                 "python/sglang/srt/lora/lora_config.py (use_dora, rank/alpha overrides, added_tokens.json)")
SGLANG_LORA = ("https://github.com/sgl-project/sglang/blob/002c60aa61549a08b2d4662d0f876f1fc6aa6863/"
               "python/sglang/srt/lora/lora.py (scaling = lora_alpha / r; peft_type must be lora; supported layer types)")
LLAMACPP_CONVERT = ("https://github.com/ggml-org/llama.cpp/blob/0b03adaa632b76c7651dd1f6fa3b7a0b5eda479c/"
                    "convert_lora_to_gguf.py (one adapter.lora.alpha = lparams['lora_alpha']; only lora_A/lora_B "
                    "tensors, other names exit; lm_head refused when tied)")
TRTLLM_DOCS = ("https://nvidia.github.io/TensorRT-LLM/advanced/lora.html and tensorrt_llm/lora_manager.py "
               "(HF PEFT adapters: lora_A/lora_B of attention and MLP linears, scale lora_alpha / r)")
PEFT_SRC = "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/config.py and tuners/lora/layer.py"
DIFFUSERS_SRC = ("https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/"
                 "lora_conversion_utils.py (kohya/LoRA keys; LyCORIS LoHa/LoKr keys are not converted)")
COMFY_SRC = "https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/lora.py and comfy/weight_adapter/ (LoRA, LoHa, LoKr, DoRA)"
LORATOOLS = "loratools (what loading the adapter against --base found)"


@dataclass(frozen=True)
class Rule:
    id: str
    target: str
    check: str
    severity: str
    message: str
    fix: str
    holds_for: str
    source: str
    params: dict = field(default_factory=dict)


def _common(target: str, engine: str) -> list[Rule]:
    """Coverage rules every target has."""
    return [
        Rule(f"{target}.zero-coverage", target, "zero_coverage", "error",
             "no module of the adapter matches a module of the base checkpoint ({example}): it adapts another model",
             "pass the base the adapter was trained for (--base), or --family; there is nothing to serve",
             "all versions", LORATOOLS),
        Rule(f"{target}.partial-coverage", target, "partial_coverage", "error",
             "{n} module(s) match no module of the base ({example}): " + engine + " ignores or refuses them",
             "doctor --fix drops them (they change nothing on this base); or check --base is the right model",
             "all versions", LORATOOLS),
    ]


RULES: dict[str, list[Rule]] = {
    "vllm": [
        Rule("vllm.max-lora-rank", "vllm", "rank_cap", "error",
             "rank {rank} of {n} module(s) ({example}) is above {cap}, the largest max_lora_rank {where}",
             "doctor --fix truncates optimally to {cap} (retained energy and error per layer), or --max-rank N",
             "vLLM ≥ 0.6 (MaxLoRARanks)", VLLM_LORA_CONFIG, {"allowed": VLLM_MAX_LORA_RANKS}),
        Rule("vllm.max-lora-rank-setting", "vllm", "rank_setting", "info",
             "the adapter's largest rank is {rank}: serve with --max-lora-rank {setting} (allowed: {allowed})",
             "nothing to change; vLLM pads smaller ranks", "vLLM ≥ 0.6", VLLM_LORA_CONFIG,
             {"allowed": VLLM_MAX_LORA_RANKS}),
        Rule("vllm.dora", "vllm", "dora", "error",
             "{n} DoRA module(s) ({example}): vLLM does not support DoRA (use_dora / lora_magnitude_vector)",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "vLLM ≤ main", VLLM_PEFT_HELPER),
        Rule("vllm.modules-to-save", "vllm", "modules_to_save", "error",
             "modules_to_save {modules_to_save}: vLLM only accepts none (or classifier/score heads)",
             "doctor --fix drops the full copies (warning naming them); serve them by merging into the base instead",
             "vLLM ≤ main", VLLM_PEFT_HELPER, {"allowed": ("classifier", "score")}),
        Rule("vllm.embedding", "vllm", "embedding", "warning",
             "{n} embedding/lm_head LoRA module(s) ({example}): vLLM loads them only for models that list them in "
             "embedding_modules, with the base's vocabulary size; added-token (extra vocab) support is being removed",
             "doctor --fix drops them if your model has no embedding LoRA support", "vLLM ≥ 0.12",
             VLLM_LORA_MODEL),
        Rule("vllm.layer-kind", "vllm", "layer_kind", "error",
             "{n} module(s) are {kinds}, not plain LoRA ({example}): vLLM reads lora_A/lora_B only",
             "doctor --fix converts them to exact plain LoRA", "all versions", VLLM_LORA_MODEL),
        Rule("vllm.module-type", "vllm", "module_type", "error",
             "{n} module(s) are conv layers ({example}): vLLM adapts only the model's "
             "supported linear/embedding modules", "doctor --fix drops them (warning naming them)", "all versions",
             VLLM_LORA_MODEL),
        Rule("vllm.scale-pattern", "vllm", "global_scale", "warning",
             "{n} module(s) ({example}) have their own alpha/rank scale (rank_pattern/alpha_pattern): vLLM before "
             "per-module get_rank_and_scaling uses one lora_alpha / r",
             "doctor --fix folds each module's scale into its factors, so one lora_alpha / r is right everywhere",
             "vLLM < get_rank_and_scaling (main has it)", VLLM_PEFT_HELPER_OLD,
             {"rslora_ok": True}),
    ],
    "sglang": [
        Rule("sglang.dora", "sglang", "dora", "error",
             "{n} DoRA module(s) ({example}): SGLang serves plain LoRA only (use_dora adapters are refused)",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "SGLang ≤ main", SGLANG_CONFIG),
        Rule("sglang.rslora", "sglang", "rslora", "warning",
             "{n} rsLoRA module(s) ({example}): SGLang scales by lora_alpha / r, ignoring use_rslora",
             "doctor --fix folds alpha/√r into the factors (plain alpha / r, same outputs)", "SGLang ≤ main",
             SGLANG_LORA),
        Rule("sglang.scale-pattern", "sglang", "global_scale", "warning",
             "{n} module(s) ({example}) have their own alpha/rank scale: SGLang before rank/alpha overrides uses one "
             "lora_alpha / r", "doctor --fix folds each module's scale into its factors", "SGLang < overrides",
             SGLANG_LORA),
        Rule("sglang.modules-to-save", "sglang", "modules_to_save", "error",
             "modules_to_save {modules_to_save}: SGLang loads LoRA weights only; the full copies are not applied",
             "doctor --fix drops the full copies (warning naming them)", "SGLang ≤ main", SGLANG_LORA),
        Rule("sglang.layer-kind", "sglang", "layer_kind", "error",
             "{n} module(s) are {kinds}, not plain LoRA ({example}): SGLang asserts peft_type lora",
             "doctor --fix converts them to exact plain LoRA", "all versions", SGLANG_LORA),
        Rule("sglang.module-type", "sglang", "module_type", "error",
             "{n} module(s) are conv layers ({example}): SGLang has LoRA layers for "
             "embedding and (column/row/QKV/merged) parallel linears only", "doctor --fix drops them",
             "all versions", SGLANG_LORA),
    ],
    "llama.cpp": [
        Rule("llama.cpp.rslora", "llama.cpp", "rslora", "error",
             "{n} rsLoRA module(s) ({example}): the GGUF adapter stores one alpha and llama.cpp scales alpha / r; "
             "use_rslora is ignored", "doctor --fix folds alpha/√r into the factors (exact); loratools' gguf "
             "converter folds it too", "convert_lora_to_gguf.py ≤ master", LLAMACPP_CONVERT),
        Rule("llama.cpp.global-alpha", "llama.cpp", "global_alpha", "error",
             "{n} module(s) ({example}) need their own alpha (alpha_pattern, or alphas that differ): the GGUF "
             "adapter has one adapter.lora.alpha (lora_alpha of adapter_config.json) for every tensor",
             "doctor --fix folds each module's scale into its factors so alpha={alpha} is right everywhere "
             "(loratools' gguf converter does the same); per-module ranks are fine", "convert_lora_to_gguf.py ≤ master",
             LLAMACPP_CONVERT),
        Rule("llama.cpp.dora", "llama.cpp", "dora", "error",
             "{n} DoRA module(s) ({example}): lora_magnitude_vector is not a lora_A/lora_B tensor; the converter exits",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "convert_lora_to_gguf.py ≤ master",
             LLAMACPP_CONVERT),
        Rule("llama.cpp.modules-to-save", "llama.cpp", "modules_to_save", "error",
             "modules_to_save {modules_to_save}: full tensors (e.g. embed_tokens/lm_head after adding tokens) are "
             "not LoRA tensors; the converter exits",
             "doctor --fix drops them (warning naming them); added tokens need a merged model, not an adapter",
             "convert_lora_to_gguf.py ≤ master", LLAMACPP_CONVERT),
        Rule("llama.cpp.embedding", "llama.cpp", "embedding", "warning",
             "{n} embedding/lm_head LoRA module(s) ({example}): lm_head LoRA is refused when the model ties it to "
             "the token embeddings, and embedding LoRA is converted only in mergekit's transposed layout",
             "doctor --fix drops them", "convert_lora_to_gguf.py ≤ master", LLAMACPP_CONVERT),
        Rule("llama.cpp.layer-kind", "llama.cpp", "layer_kind", "error",
             "{n} module(s) are {kinds}, not plain LoRA ({example}): the converter reads lora_A/lora_B only",
             "doctor --fix converts them to exact plain LoRA", "all versions", LLAMACPP_CONVERT),
        Rule("llama.cpp.module-type", "llama.cpp", "module_type", "error",
             "{n} module(s) are conv layers ({example})", "doctor --fix drops them",
             "all versions", LLAMACPP_CONVERT),
    ],
    "tensorrt-llm": [
        Rule("tensorrt-llm.dora", "tensorrt-llm", "dora", "error",
             "{n} DoRA module(s) ({example}): the HF LoRA loader reads lora_A/lora_B only",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "TensorRT-LLM ≤ main", TRTLLM_DOCS),
        Rule("tensorrt-llm.rslora", "tensorrt-llm", "rslora", "error",
             "{n} rsLoRA module(s) ({example}): scale lora_alpha / r, use_rslora is not read",
             "doctor --fix folds alpha/√r into the factors", "TensorRT-LLM ≤ main", TRTLLM_DOCS),
        Rule("tensorrt-llm.global-scale", "tensorrt-llm", "global_scale", "error",
             "{n} module(s) ({example}) have their own alpha/rank scale: one lora_alpha / r applies",
             "doctor --fix folds each module's scale into its factors", "TensorRT-LLM ≤ main", TRTLLM_DOCS),
        Rule("tensorrt-llm.modules-to-save", "tensorrt-llm", "modules_to_save", "error",
             "modules_to_save {modules_to_save}: not LoRA weights", "doctor --fix drops them", "TensorRT-LLM ≤ main",
             TRTLLM_DOCS),
        Rule("tensorrt-llm.embedding", "tensorrt-llm", "embedding", "error",
             "{n} embedding/lm_head LoRA module(s) ({example}): LoRA modules are attention and MLP linears only",
             "doctor --fix drops them", "TensorRT-LLM ≤ main", TRTLLM_DOCS),
        Rule("tensorrt-llm.layer-kind", "tensorrt-llm", "layer_kind", "error",
             "{n} module(s) are {kinds}, not plain LoRA ({example})", "doctor --fix converts them to exact plain LoRA",
             "all versions", TRTLLM_DOCS),
        Rule("tensorrt-llm.module-type", "tensorrt-llm", "module_type", "error",
             "{n} module(s) are conv layers ({example})", "doctor --fix drops them",
             "all versions", TRTLLM_DOCS),
    ],
    "peft": [
        Rule("peft.layer-kind", "peft", "layer_kind", "error",
             "{n} module(s) are {kinds} ({example}): PEFT cannot load them as a LoRA adapter",
             "doctor --fix converts them to exact plain LoRA (or keep them in a PEFT LoHa/LoKr folder)",
             "peft ≥ 0.7", PEFT_SRC, {"peft_native": True}),
        Rule("peft.dora-axis", "peft", "dora_axis", "error",
             "{n} LyCORIS DoRA module(s) ({example}) scale input columns (wd_on_output=False): PEFT DoRA has no such form",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "peft ≥ 0.9", PEFT_SRC),
        Rule("peft.mixed-dora", "peft", "mixed_dora", "error",
             "{n} module(s) have DoRA magnitudes and others none ({example}): use_dora is adapter-wide in PEFT",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "peft ≥ 0.9", PEFT_SRC),
        Rule("peft.unresolved-names", "peft", "unresolved", "error",
             "{n} module(s) keep kohya stems ({example}): PEFT needs module paths",
             "pass --base (the model the adapter was trained for) to resolve them", "all versions", LORATOOLS),
    ],
    "diffusers": [
        Rule("diffusers.layer-kind", "diffusers", "layer_kind", "error",
             "{n} module(s) are {kinds} ({example}): load_lora_weights converts kohya/PEFT LoRA keys, not LyCORIS "
             "LoHa/LoKr/full layers", "doctor --fix converts them to exact plain LoRA", "diffusers ≤ main",
             DIFFUSERS_SRC),
        Rule("diffusers.dora-axis", "diffusers", "dora_axis", "error",
             "{n} LyCORIS DoRA module(s) ({example}) scale input columns: PEFT (which diffusers loads through) has no "
             "such form", "doctor --fix --base CKPT folds the magnitudes", "diffusers ≤ main", DIFFUSERS_SRC),
        Rule("diffusers.unresolved-names", "diffusers", "unresolved", "warning",
             "{n} module(s) keep kohya stems that loratools could not resolve ({example})",
             "pass --base to check and resolve them", "all versions", LORATOOLS),
    ],
    "comfyui": [
        Rule("comfyui.embedding", "comfyui", "embedding", "error",
             "{n} embedding LoRA module(s) ({example}): ComfyUI's LoRA loader patches linear and conv weights by key",
             "doctor --fix drops them", "ComfyUI ≤ master", COMFY_SRC),
        Rule("comfyui.dora", "comfyui", "dora", "error",
             "{n} DoRA module(s) ({example}): ComfyUI's dora_scale formula (output-axis norm of the base weight) is "
             "neither PEFT's nor LyCORIS's, so the adapter would not compute what it was trained to",
             "doctor --fix --base CKPT folds the magnitudes into plain LoRA", "ComfyUI ≤ master", COMFY_SRC),
        Rule("comfyui.no-family", "comfyui", "no_family", "warning",
             "the adapter's names belong to no Stable Diffusion family loratools knows ({example}): ComfyUI maps only "
             "its model's own keys, so these would be skipped",
             "pass --base CKPT (the model it is for) or --family to check the names", "ComfyUI ≤ master", COMFY_SRC),
        Rule("comfyui.unresolved-names", "comfyui", "unresolved", "warning",
             "{n} module(s) keep kohya stems that loratools could not resolve ({example})",
             "pass --base to check them against the model", "all versions", LORATOOLS),
    ],
}

for _t, _engine in (("vllm", "vLLM"), ("sglang", "SGLang"), ("llama.cpp", "llama.cpp"),
                    ("tensorrt-llm", "TensorRT-LLM"), ("peft", "PEFT"), ("diffusers", "diffusers"),
                    ("comfyui", "ComfyUI")):
    RULES[_t] = _common(_t, _engine) + RULES[_t]


def rules_for(target: str) -> list[Rule]:
    return RULES[target]
