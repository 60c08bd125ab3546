"""The unified model: `UnifiedForCausalLM` computes every dense family from its ModelSpec, and
`UnifiedForRewardModel` puts a scalar value head on the same trunk.

Importing this package registers `reference_unified` with transformers' AutoConfig,
AutoModelForCausalLM and AutoModelForSequenceClassification, so
`AutoModelForCausalLM.from_pretrained(unified_dir)` works after it.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from reference.modeling.config import MODEL_TYPE, UnifiedConfig
from reference.modeling.model import UnifiedForCausalLM
from reference.modeling.reward import UnifiedForRewardModel

AutoConfig.register(MODEL_TYPE, UnifiedConfig, exist_ok=True)
AutoModelForCausalLM.register(UnifiedConfig, UnifiedForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(UnifiedConfig, UnifiedForRewardModel, exist_ok=True)

__all__ = ["UnifiedConfig", "UnifiedForCausalLM", "UnifiedForRewardModel"]
