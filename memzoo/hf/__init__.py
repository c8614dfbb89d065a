"""memzoo's memories on other people's transformers models (opt-in: ``import memzoo.hf``).

* :class:`EvictingCache` - a ``transformers.Cache`` whose layers keep at most ``budget`` tokens, chosen
  by a memzoo eviction policy (``full``, ``window``, ``sinks``, ``h2o``, ``l2``, ``namm``).
* :func:`attention_probs` / :data:`ATTENTION` - the attention that gives ``h2o`` and ``namm`` the
  probabilities they score by, under masks built from the kept tokens' positions;
  :func:`check_model` refuses models it cannot manage (:data:`TESTED_MODELS` are the tested ones).
* :func:`generate_cache_kwargs` - ``cache=`` or ``past_key_values=``, whichever this transformers takes.
* :func:`namm_parameters` / :func:`set_namm_parameters` - read and write the NAMM scorer of a cache
  (or of a memzoo model) as one flat vector, for evolution.
"""

from ..memories.namm import load_namm_parameters, namm_parameter_count, namm_parameters, save_namm_parameters, set_namm_parameters
from .attention import ATTENTION, TESTED_MODELS, attention_probs, check_model, evicting_attention
from .cache import POLICIES, EvictingCache, EvictingLayer, generate_cache_kwargs

__all__ = [
    "EvictingCache",
    "EvictingLayer",
    "POLICIES",
    "generate_cache_kwargs",
    "ATTENTION",
    "attention_probs",
    "evicting_attention",
    "check_model",
    "TESTED_MODELS",
    "namm_parameters",
    "set_namm_parameters",
    "namm_parameter_count",
    "load_namm_parameters",
    "save_namm_parameters",
]
