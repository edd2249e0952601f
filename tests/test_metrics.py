"""CLIP score and Fréchet distance on a tiny CLIP."""
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from pipelines import metrics
from shapes import render
from tests.tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=dict(common, vocab_size=len(tok), max_position_embeddings=16,
                                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id),
                                 vision_config=dict(common, image_size=64, patch_size=16), projection_dim=16)).eval()
    return model, tok


def test_clip_score_range_and_shape(clip):
    images = [render("a red circle", i) for i in range(3)]
    scores = metrics.clip_score(clip, images, ["a red circle"] * 3)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()


def test_images_of_other_sizes_are_resized(clip):
    big = np.zeros((128, 96, 3), dtype=np.uint8)
    assert metrics.image_features(clip, [big]).shape == (1, 16)


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near = metrics.frechet_distance(a, a + 0.1)
    far = metrics.frechet_distance(a, a + 1.0)
    assert 0 < near < far and far == pytest.approx(8.0, rel=0.05)
    with pytest.raises(ValueError):
        metrics.frechet_distance(a[:1], a)
