"""Weight-free metrics on hand-made cases, and CLIP metrics with a tiny random open_clip model loaded
back from a local checkpoint."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from mmgen.evals.format import EvalSample
from mmgen.evals.metrics import (
    ReferenceScorer,
    image_count,
    image_count_error,
    image_order,
    kendall_tau,
    levenshtein,
    psnr,
    rouge_l,
    ssim,
    structure,
    structure_match,
)
from mmgen.segments import Image, Text

C1 = (0.01 * 255) ** 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine is shared; one torch thread keeps these small ops fast and predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flat(value, size=(24, 24)):
    return PIL.Image.new("RGB", size, (value, value, value))


def noise(seed, size=(40, 32)):
    return PIL.Image.fromarray(
        np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )


def T(s="t"):
    return Text(s)


def I(im=None):  # noqa: E743 - reads like the [T, I, ...] notation of the structure tests
    return Image(im if im is not None else flat(0))


# ---------------------------------------------------------------- structure and counts


def test_structure_match_is_exact_equality_of_the_modality_sequence():
    assert structure_match([T(), I(), T(), I()], [T("other"), I(), T("words"), I()])
    assert not structure_match([T(), I(), I()], [T(), I()])  # one image too many
    assert not structure_match([I(), T()], [T(), I()])  # same content, wrong order
    assert not structure_match([], [T()])


def test_structure_ignores_how_a_run_of_text_is_split_unless_asked_not_to():
    assert structure([T("a"), T("b"), Text("  "), I()]) == ["text", "image"]
    assert structure_match([T("a"), T("b"), I()], [T(), I()])
    assert not structure_match([T("a"), T("b"), I()], [T(), I()], normalize=False)


def test_image_count_and_absolute_count_error():
    assert image_count([T(), I(), I(), T()]) == 2
    assert image_count_error([I()], [T(), I(), I(), I()]) == 2
    assert image_count_error([I(), I(), I()], [I()]) == 2


# ---------------------------------------------------------------- SSIM and PSNR


def test_ssim_of_identical_images_is_one_and_psnr_is_infinite():
    im = noise(0)
    assert ssim(im, im) == pytest.approx(1.0, abs=1e-12)
    assert psnr(im, im) == math.inf


def test_ssim_of_two_flat_images_matches_the_closed_form():
    # with zero variance, SSIM reduces to its luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 100, 150
    assert ssim(flat(a), flat(b)) == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), rel=1e-9)


def test_psnr_matches_the_closed_form():
    # mse = 10^2 = 100 -> 10 log10(255^2 / 100)
    assert psnr(flat(0), flat(10)) == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-9)


def gradient(size=(64, 48)):
    x = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    return PIL.Image.fromarray(x.astype(np.uint8))


def test_ssim_resizes_to_a_common_size_and_drops_with_noise():
    im = gradient()
    assert ssim(im, im.resize((32, 24)), size=64) > 0.95  # a smooth image survives the round trip
    im = noise(1, size=(64, 48))
    assert ssim(im, noise(2, size=(64, 48))) < 0.1
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(im, im, size=8)


# ---------------------------------------------------------------- image order


def test_edit_distance_and_kendall_tau_on_hand_made_orders():
    assert levenshtein([0, 1, 2], [0, 1, 2]) == 0
    assert levenshtein([1, 0], [0, 1]) == 2
    assert levenshtein([0, 2], [0, 1, 2]) == 1
    assert kendall_tau([0, 1, 2, 3]) == 1.0
    assert kendall_tau([3, 2, 1, 0]) == -1.0
    assert kendall_tau([0, 2, 1]) == pytest.approx(1 / 3)
    assert kendall_tau([5]) is None


def test_image_order_matches_images_by_ssim_then_compares_orders():
    a, b, c = noise(10), noise(11), noise(12)
    same = image_order([a, b, c], [a, b, c], size=32)
    assert same.sequence == [0, 1, 2] and same.edit_distance == 0 and same.kendall_tau == 1.0
    assert same.mean_similarity == pytest.approx(1.0)

    swapped = image_order([c, b, a], [a, b, c], size=32)
    assert swapped.sequence == [2, 1, 0] and swapped.kendall_tau == -1.0 and swapped.edit_distance == 2

    missing = image_order([a, c], [a, b, c], size=32)
    assert missing.sequence == [0, 2] and missing.edit_distance == 1 and missing.kendall_tau == 1.0

    extra = image_order([a, flat(7, (40, 32)), b], [a, b], size=32)
    assert extra.sequence == [0, None, 1] and extra.edit_distance == 1


def test_image_order_can_use_another_similarity_and_a_threshold():
    brightness = lambda p, g: -abs(np.asarray(p).mean() - np.asarray(g).mean())  # noqa: E731
    # best assignment: 200 -> 250 (similarity -50), 10 -> 0 (-10)
    order = image_order([flat(200), flat(10)], [flat(0), flat(250)], similarity=brightness)
    assert order.sequence == [1, 0] and order.kendall_tau == -1.0
    strict = image_order(
        [flat(200), flat(10)], [flat(0), flat(250)], similarity=brightness, min_similarity=-20
    )
    assert strict.sequence == [None, 0] and strict.edit_distance == 2


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_is_the_lcs_f_measure():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS 5, P = 5/6, R = 5/5 -> F1 = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # LCS "a c" = 2 of 3 and of 4 words: P = 2/3, R = 1/2 -> F1 = 4/7
    assert rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)
    assert rouge_l("The Cat!", "the cat") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "cat") == 0.0


def test_rouge_l_beta_weights_recall():
    # P = 1, R = 1/2: F_beta=2 = 5 * P * R / (R + 4 P) = 2.5 / 4.5
    assert rouge_l("a b", "a b c d", beta=2.0) == pytest.approx(2.5 / 4.5)


# ---------------------------------------------------------------- the runner's scorer


def test_reference_scorer_reports_every_metric_against_the_golden_answer():
    a, b = noise(20), noise(21)
    sample = EvalSample("s", [T("q")], golden=[T("two pictures of shapes"), I(a), I(b)])
    scores = ReferenceScorer(image_size=32)(sample, [T("two pictures of shapes"), I(a), I(b)])
    assert scores["structure_match"] is True and scores["image_count_error"] == 0
    assert scores["rouge_l"] == 1.0 and scores["order_edit_distance"] == 0 and scores["kendall_tau"] == 1.0
    assert scores["ssim"] == pytest.approx(1.0) and scores["psnr"] == 100.0  # identical: capped, finite

    no_golden = ReferenceScorer()(EvalSample("t", [T("q")]), [I(a)])
    assert no_golden == {"n_images": 1}


# ---------------------------------------------------------------- CLIP

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from mmgen.evals.clip_score import load_clip_scorer

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return model, load_clip_scorer(path, "mmgen-test-tiny-clip", model_config=TINY_CLIP)


def test_clip_loader_restores_the_checkpoint_weights(tiny_clip):
    model, scorer = tiny_clip
    saved, loaded = model.state_dict(), scorer.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_clip_score_is_2_5_times_the_clipped_cosine_of_each_text_and_its_image(tiny_clip):
    _, scorer = tiny_clip
    red, blue = PIL.Image.new("RGB", (40, 40), (255, 0, 0)), PIL.Image.new("RGB", (40, 40), (0, 0, 255))
    output = [Text("a red square"), Image(red), Text("  "), Image(blue), Text("a blue square"), Image(blue)]
    texts = scorer.embed_texts(["a red square", "a red square", "a blue square"])
    images = scorer.embed_images([red, blue, blue])
    expected = [2.5 * max(float(c), 0.0) for c in (texts * images).sum(-1)]
    assert scorer.clip_scores(output) == pytest.approx(expected, abs=1e-6)
    assert scorer.clip_score(output) == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert scorer.clip_score([Image(red), Text("no image after me")]) is None


def test_image_consistency_is_the_mean_cosine_of_consecutive_images(tiny_clip):
    _, scorer = tiny_clip
    a, b = noise(30), noise(31)
    assert scorer.image_consistency([Image(a), Text("x"), Image(a)]) == pytest.approx(1.0, abs=1e-5)
    emb = scorer.embed_images([a, b, a])
    expected = float((emb[:-1] * emb[1:]).sum(-1).mean())
    assert scorer.image_consistency([Image(a), Image(b), Image(a)]) == pytest.approx(expected, abs=1e-6)
    assert scorer.image_consistency([Image(a)]) is None


class _FixedEmbeddings:
    """Stands in for a CLIP model with chosen unit vectors, to pin CLIPScore's formula exactly."""

    def __init__(self):
        from mmgen.evals.clip_score import ClipScorer

        self.scorer = ClipScorer(model=None, preprocess=None, tokenizer=None)
        vectors = {"up": [1.0, 0.0], "diag": [0.6, 0.8], "down": [-1.0, 0.0]}
        self.scorer.embed_texts = lambda texts: torch.tensor([vectors[t] for t in texts])
        self.scorer.embed_images = lambda images: torch.tensor([[1.0, 0.0]] * len(images))


def test_clip_score_pairs_each_image_with_the_text_before_it_and_clips_negative_cosines():
    scorer = _FixedEmbeddings().scorer
    output = [Text("diag"), Image(flat(1)), Image(flat(2)), Text("down"), Image(flat(3))]
    # cos = 0.6, 0.6 (the same text leads into both images), -1 -> clipped to 0
    assert scorer.clip_scores(output) == pytest.approx([1.5, 1.5, 0.0])


def test_clip_loader_refuses_anything_that_would_download(tmp_path):
    from mmgen.evals.clip_score import load_clip_scorer

    with pytest.raises(ValueError, match="not found.*nothing is downloaded"):
        load_clip_scorer("laion2b_s34b_b79k", "ViT-B-32")
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="remote or directory source"):
        load_clip_scorer(ckpt, "hf-hub:org/model")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip_scorer(ckpt, "no-such-arch")
