"""The unified model: `UnifiedForCausalLM` computes every dense family from its ModelSpec.

Importing this package registers `reference_unified` with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(unified_dir)` works after it.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from reference.modeling.config import MODEL_TYPE, UnifiedConfig
from reference.modeling.model import UnifiedForCausalLM

AutoConfig.register(MODEL_TYPE, UnifiedConfig, exist_ok=True)
AutoModelForCausalLM.register(UnifiedConfig, UnifiedForCausalLM, exist_ok=True)

__all__ = ["UnifiedConfig", "UnifiedForCausalLM"]
