"""Parity with lm-evaluation-harness: -nll equals its HF backend's `loglikelihood_rolling`.

Setting that makes the two agree: `add_bos_token=False`, so lm-eval encodes the text without special
tokens, as the loss contract does (both then condition on the single prefix token, BOS else EOS).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EVAL_TEXTS
from mmc import losses

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_nll_equals_lm_eval_loglikelihood_rolling(family, request):
    model_dir = request.getfixturevalue(f"{family}_dir")
    harness = lm_eval_hf.HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4,
                              add_bos_token=False)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
                for i, text in enumerate(EVAL_TEXTS)]
    expected = np.array(harness.loglikelihood_rolling(requests, disable_tqdm=True))
    loaded = losses.load_model(str(model_dir), device="cpu", dtype="float32")
    nll, _ = losses.score_texts(loaded, EVAL_TEXTS, batch_tokens=128)
    np.testing.assert_allclose(-nll, expected, rtol=1e-4)
