"""Models: loading (aliases, GGUF conversion, the hub, adapters), attention implementations,
preparing a model for training, and the scalar-head model used as reward model and critic.

``from posttrain.models import load_model`` keeps working: the loading functions are
re-exported here."""

from posttrain.models.loading import (  # noqa: F401
    ADAPTER_CONFIG,
    DEFAULT_MODEL,
    MODEL_ALIASES,
    ModelLoadError,
    adapter_base,
    bf16_is_native,
    cache_dir,
    convert_gguf,
    inference_dtype,
    load_model,
    load_model_config,
    load_tokenizer,
    merge_adapter,
    resolve_model_dir,
)
