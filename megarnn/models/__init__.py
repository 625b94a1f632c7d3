from megarnn.config import ModelConfig
from megarnn.models.lm import RecurrentLM

__all__ = ["ModelConfig", "RecurrentLM"]
