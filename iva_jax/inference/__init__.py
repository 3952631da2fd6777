"""KV cache, sampling and the generate loop."""

from iva_jax.inference.kv_cache import KVCache  # noqa: F401
from iva_jax.inference.generate import as_variables, generate, generate_stream  # noqa: F401,E402
from iva_jax.inference.sampling import SamplingConfig  # noqa: F401,E402
from iva_jax.inference.paged import PageAllocator, PagedKVCache, generate_paged  # noqa: F401,E402
from iva_jax.inference.continuous import ContinuousBatcher  # noqa: F401,E402
