"""Speculative drafting: lossless greedy decoding with every drafter, an unchanged sampling distribution,
per-row verification in batches, the vision head's training and its save/load with the pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import chisquare

from mmgen import Image, Text
from mmgen.draft_training import (
    DrafterTrainArguments,
    build_draft_lm,
    build_head,
    generate_traces,
    head_batch_loss,
    measure_tau,
    train_draft_lm,
    train_drafter,
    train_head,
)
from mmgen.drafting import (
    ContextUpdate,
    Draft,
    Drafter,
    DraftLMDrafter,
    DraftRequest,
    ItemWalker,
    NgramDrafter,
    RowCache,
    Sampling,
    VisionDraftHead,
    VisionHeadDrafter,
    verify_drafts,
)
from mmgen.evals.bench_drafting import _identical
from mmgen.model_card import write_model_card
from mmgen.pipelines import MMGenPipeline
from mmgen.stream import TEXT

from .conftest import BACKBONE_TYPES, tiny_backbone

GREEDY = dict(max_new_tokens=28, num_inference_steps=1, max_images=2, output_type="latent")


def seeded(n: int = 1, base: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + k) for k in range(n)]


def signature(segments) -> tuple:
    """A row's output as the drafting bench compares it: its texts, and its latents (to within float noise)."""
    return tuple(s.text if isinstance(s, Text) else s.latent for s in segments)


def same_rows(rows, signatures) -> bool:
    return len(rows) == len(signatures) and all(_identical(signature(r), s) for r, s in zip(rows, signatures))


def random_head(pipe, image_adaptor: bool = True, seed: int = 0) -> VisionDraftHead:
    torch.manual_seed(seed)
    hidden = pipe.backbone.get_input_embeddings().weight.shape[1]
    return VisionDraftHead(hidden_size=hidden, num_heads=4, intermediate_size=64, image_adaptor=image_adaptor)


class Recorder(Drafter):
    """Drafts nothing; remembers each row's text tokens as the target's cache received them."""

    def start(self, batch_size, sampling):
        super().start(batch_size, sampling)
        self.tokens = [[] for _ in range(batch_size)]

    def extend(self, row, update):
        self.tokens[row] += [t for t, m in zip(update.ids, update.modality) if m == TEXT]

    def propose(self, requests):
        return [Draft() for _ in requests]


def wrong(token: int, shift: int = 1) -> int:
    """An ordinary token other than `token`."""
    return 10 + (token - 10 + shift) % 400 if 10 <= token < 410 else 10 + shift


class Oracle(Drafter):
    """Knows plain decoding's text (from a `Recorder`) and drafts it, with the last token wrong in every
    `wrong_every`-th draft: so drafts get accepted in full, in part, and not at all.

    With `middle` the wrong token sits mid-draft. With `tree` every depth also drafts a wrong alternative, and
    the wrong token's depth the right one too: greedy verification must take that one and no other."""

    def __init__(self, truth: list[list[int]], length: int = 5, wrong_every: int = 4, middle: bool = False,
                 tree: bool = False):
        self.truth, self.length, self.wrong_every, self.middle, self.tree = truth, length, wrong_every, middle, tree

    def start(self, batch_size, sampling):
        super().start(batch_size, sampling)
        self.seen = [0] * batch_size
        self.calls = 0
        self.wrong_at: list[int | None] = [None] * batch_size  # the depth of the last draft's wrong token
        self.verdicts: list[tuple[int, int]] = []  # (depth of the wrong token, tokens accepted) per wrong draft

    def extend(self, row, update):
        self.seen[row] += sum(m == TEXT for m in update.modality)

    def propose(self, requests):
        drafts = []
        for req in requests:
            self.calls += 1
            truth = self.truth[req.row][self.seen[req.row] + 1 : self.seen[req.row] + 1 + self.length]
            draft = list(truth)
            at = len(truth) // 2 if self.middle else len(truth) - 1
            self.wrong_at[req.row] = None
            if self.calls % self.wrong_every == 0 and truth:
                draft[at] = wrong(truth[at])
                self.wrong_at[req.row] = at
            alternatives = [[wrong(t, 2)] for t in draft] if self.tree else []
            if alternatives and draft != truth:
                alternatives[at].append(truth[at])
            drafts.append(Draft(draft, alternatives=alternatives))
        return drafts

    def feedback(self, row, drafted, accepted):
        if self.wrong_at[row] is not None:
            self.verdicts.append((self.wrong_at[row], accepted))


def plain_tokens(pipe, prompts, **kwargs) -> tuple[list, list[list[int]]]:
    recorder = Recorder()
    out = pipe(prompts, drafter=recorder, generator=seeded(len(prompts)), **kwargs)
    return [signature(row) for row in out.segments], recorder.tokens


# -- verification ----------------------------------------------------------------------------------------
def test_greedy_verification_accepts_the_longest_agreeing_prefix_then_the_targets_token():
    vocab = 6
    argmax = torch.tensor([[2, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]])
    logits = torch.nn.functional.one_hot(argmax, vocab).float() * 5
    drafts = torch.tensor([[2, 3, 4], [2, 1, 4], [1, 3, 4]])
    accepted, following = verify_drafts(logits, drafts, torch.tensor([3, 3, 2]), Sampling())
    assert accepted.tolist() == [3, 1, 0]
    assert following.tolist() == [5, 3, 2]


def test_the_draft_head_cache_grows_past_its_buffer_and_drops_only_drafted_keys():
    cache, keys, values = RowCache(), [], []
    for step in range(40):  # 1-3 items a step: well past the first buffer of 64
        k, v = torch.randn(2, 1 + step % 3, 4), torch.randn(2, 1 + step % 3, 4)
        cache.append(k, v, true=True)
        keys.append(k)
        values.append(v)
    assert torch.equal(cache.view()[0], torch.cat(keys, 1)) and torch.equal(cache.view()[1], torch.cat(values, 1))
    true_length = cache.length
    cache.append(torch.randn(2, 3, 4), torch.randn(2, 3, 4), true=False)
    assert cache.length == true_length + 3
    cache.drop_drafted()
    assert torch.equal(cache.view()[0], torch.cat(keys, 1))


def test_a_draft_tree_puts_alternatives_after_the_chain_each_seeing_only_its_ancestors():
    from mmgen.drafting import accepted_alternative, draft_tree

    draft = Draft([5, 6, 7], alternatives=[[50], [], [70, 71]])
    tokens, depths, sees = draft_tree(draft)
    assert tokens == [5, 6, 7, 50, 70, 71] and depths == [1, 2, 3, 1, 3, 3]
    # [pending, 5, 6, 7, 50, 70, 71]: the chain is causal; 50 sees the pending token, 70 and 71 also 5 and 6.
    assert sees[:4, :4].equal(torch.ones(4, 4, dtype=torch.bool).tril())
    assert sees[4].nonzero().flatten().tolist() == [0, 4]
    assert sees[5].nonzero().flatten().tolist() == [0, 1, 2, 5]
    assert sees[6].nonzero().flatten().tolist() == [0, 1, 2, 6]
    assert not sees[:4, 4:].any(), "the chain never sees an alternative"
    assert accepted_alternative(draft, 0, 50) == 3 and accepted_alternative(draft, 2, 71) == 5
    assert accepted_alternative(draft, 1, 50) is None, "an alternative counts only at its own depth"
    assert accepted_alternative(draft, 3, 70) is None, "the whole chain was accepted"
    assert draft_tree(Draft([5, 6]))[2].equal(torch.ones(3, 3, dtype=torch.bool).tril())


def first_tokens(p0: torch.Tensor, drafts: torch.Tensor, logits: torch.Tensor, sampling: Sampling,
                 q: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = drafts.shape[0]
    accepted, following = verify_drafts(
        logits.expand(n, -1, -1), drafts, torch.full((n,), drafts.shape[1]), sampling,
        torch.Generator().manual_seed(seed), q,
    )
    first = torch.where(accepted > 0, drafts[:, 0], following)
    second = torch.where(accepted > 1, drafts[:, 1], following)
    return first, second[accepted >= 1]


def assert_matches(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit, tokens with expected counts below 5 pooled into one bin."""
    counts = torch.bincount(samples, minlength=len(probs)).double().numpy()
    expected = probs.double().numpy() * len(samples)
    assert counts[expected == 0].sum() == 0, "a token the target gives probability 0 was emitted"
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep] * observed[keep].sum() / wanted[keep].sum()
    assert chisquare(observed, wanted).pvalue > 0.01


@pytest.mark.parametrize(
    "sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=20, top_p=0.9)], ids=["plain", "top-k-p"]
)
@pytest.mark.parametrize("drafter", ["deterministic", "sampled"])
def test_rejection_sampling_leaves_the_target_distribution_unchanged(make_pipeline, sampling, drafter):
    pipe = make_pipeline("llama")
    model = pipe.unified
    ids = pipe.codec.encode([Text("a red circle left of a blue square.")], []).input_ids
    with torch.no_grad():
        hidden, _ = model.run_backbone(model.text_embeddings(ids[None]), torch.arange(len(ids))[None])
        logits = model.logits(hidden[:, -3:])
    logits = 3.0 * logits / logits.std(-1, keepdim=True)  # a random model is flat: make a few tokens likely
    p = sampling.probs(logits[0])
    n = 20_000
    if drafter == "deterministic":  # the target's 1st, then its 2nd choice: accepted sometimes, not always
        q = None
        choices = p[:2].topk(2, dim=-1).indices
        drafts = torch.stack([choices[0, 0], choices[1, 1]]).expand(n, -1).clone()
    else:  # a different distribution, sampled per row
        q_dist = torch.softmax(torch.randn(2, p.shape[-1], generator=torch.Generator().manual_seed(1)) * 2, -1)
        q_dist = 0.5 * q_dist + 0.5 * p[:2]
        drafts = torch.stack([torch.multinomial(q_dist[k], n, replacement=True,
                                                generator=torch.Generator().manual_seed(2 + k)) for k in range(2)], 1)
        q = q_dist.expand(n, -1, -1)
    first, second_after_accept = first_tokens(p[0], drafts, logits, sampling, q, seed=3)
    assert_matches(first, p[0])
    # Given the first draft was accepted, the second token follows the target's next distribution.
    if drafter == "deterministic":
        assert len(second_after_accept) > 1000
        assert_matches(second_after_accept, p[1])


def test_sampled_drafting_is_reproducible_with_seeds_and_the_same_drafter_state(make_pipeline):
    pipe = make_pipeline("qwen2")
    pipe.register_modules(drafter=random_head(pipe))
    kwargs = dict(max_new_tokens=16, max_images=0, temperature=0.9, top_k=40)
    for drafter in (NgramDrafter, lambda: "vision-head"):
        first = pipe(["tell a story.", "draw."], generator=seeded(2), drafter=drafter(), **kwargs)
        second = pipe(["tell a story.", "draw."], generator=seeded(2), drafter=drafter(), **kwargs)
        assert first.text == second.text
        assert pipe.last_stats.text_tokens > 0
    # Sampled drafts are chains: a head set to draft trees samples exactly as one that is not.
    chains, trees = (pipe(["tell a story.", "draw."], generator=seeded(2), **kwargs,
                          drafter=VisionHeadDrafter(pipe.drafter, pipe.unified, siblings=n)) for n in (0, 2))
    assert chains.text == trees.text


# -- greedy decoding is lossless -------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONE_TYPES)
def test_greedy_drafting_is_token_identical_to_plain_decoding(make_pipeline, tokenizer, backbone):
    pipe = make_pipeline(backbone, image_scale=6.0)
    prompt = ["tell a story about a red circle."]
    plain, truth = plain_tokens(pipe, prompt, **GREEDY)
    assert any(not isinstance(s, str) for s in plain[0][:-1]), "the prompt should draw images mid-text"
    pipe.drafter = random_head(pipe)
    drafters = {
        "ngram": "ngram",
        "draft-lm": DraftLMDrafter(tiny_backbone("llama", tokenizer, seed=3)),
        "vision-head": "vision-head",
        "vision-head tree": VisionHeadDrafter(pipe.drafter, pipe.unified, siblings=2),
        "oracle": Oracle(truth),
        "oracle, wrong mid-draft": Oracle(truth, middle=True),
        "oracle tree": Oracle(truth, middle=True, tree=True),
    }
    for name, drafter in drafters.items():
        out = pipe(prompt, drafter=drafter, generator=seeded(), **GREEDY)
        assert same_rows(out.segments, plain), f"{name} changed the output"
        stats = pipe.last_stats
        if name.startswith("oracle"):
            assert stats.accepted_tokens > 0 and stats.accepted_tokens < stats.drafted_tokens
            assert stats.tau > 1.5 and stats.text_forwards < stats.text_tokens
    chain, tree = drafters["oracle, wrong mid-draft"].verdicts, drafters["oracle tree"].verdicts
    assert chain and all(accepted <= at for at, accepted in chain), "a chain stops at its wrong token"
    assert tree and any(accepted == at + 1 for at, accepted in tree), "a tree takes the right token beside it"


class WidthRecorder(VisionHeadDrafter):
    """A vision head drafting one row that remembers, for each depth of its greedy drafts, the probability of
    its first choice and how many siblings it offered."""

    def start(self, batch_size, sampling):
        super().start(batch_size, sampling)
        self.tops, self.widths, logits = [], [], self.layer.logits

        def recorded(features, bias):
            out = logits(features, bias)
            self.tops += out.softmax(-1).max(-1).values.tolist()
            return out

        self.layer.logits = recorded

    def propose(self, requests):
        drafts = super().propose(requests)
        self.widths += [len(a) for d in drafts for a in d.alternatives]
        return drafts

    def finish(self):
        del self.layer.logits  # the head keeps its layer between calls: back to the class's method
        super().finish()


def test_siblings_go_only_to_the_depths_where_the_head_is_unsure(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe.drafter = random_head(pipe)
    prompt = ["tell a story about a red circle."]
    plain = [signature(r) for r in pipe(prompt, generator=seeded(), **GREEDY).segments]
    everywhere = WidthRecorder(pipe.drafter, pipe.unified, siblings=2)
    assert same_rows(pipe(prompt, drafter=everywhere, generator=seeded(), **GREEDY).segments, plain)
    assert everywhere.widths and set(everywhere.widths) == {2}, "without a threshold: at every depth"
    threshold = sorted(everywhere.tops)[len(everywhere.tops) // 2]
    unsure = WidthRecorder(pipe.drafter, pipe.unified, siblings=2, siblings_below=threshold)
    assert same_rows(pipe(prompt, drafter=unsure, generator=seeded(), **GREEDY).segments, plain), "still lossless"
    assert len(unsure.widths) == len(unsure.tops) and set(unsure.widths) == {0, 2}
    assert unsure.widths == [2 if top < threshold else 0 for top in unsure.tops]


def test_plain_decoding_has_tau_one(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe("draw a red circle.", generator=seeded(), **GREEDY)
    stats = pipe.last_stats
    assert stats.tau == 1.0 and stats.text_forwards == stats.text_tokens > 0
    assert stats.drafted_tokens == 0


def test_stats_tell_reading_the_prompts_apart_from_decoding(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    out = pipe(["a red circle.", "two blue squares."], generator=seeded(2), **{**GREEDY, "max_images": 0})
    stats = pipe.last_stats
    # With images banned, reading a prompt gives its row's first text token unless the row ends at once.
    assert stats.first_tokens == sum(bool(text) for text in out.text) > 0
    assert 0 < stats.prefill_seconds < stats.seconds
    decoded = stats.text_tokens - stats.first_tokens
    assert stats.decode_tokens_per_second == pytest.approx(decoded / (stats.seconds - stats.prefill_seconds))


def test_drafting_respects_max_new_tokens_and_max_images(make_pipeline):
    pipe = make_pipeline("gemma", image_scale=6.0)
    for limits in (dict(max_new_tokens=7, max_images=2), dict(max_new_tokens=20, max_images=0)):
        kwargs = {**GREEDY, **limits}
        plain, truth = plain_tokens(pipe, ["tell a story."], **kwargs)
        out = pipe(["tell a story."], drafter=Oracle(truth, length=12, wrong_every=1000), generator=seeded(),
                   **kwargs)
        assert same_rows(out.segments, plain)
        assert pipe.last_stats.text_tokens <= limits["max_new_tokens"]
        assert len(out.images[0]) <= limits["max_images"]


@pytest.mark.parametrize("head_text_tokens", [0, 5])
def test_batch_with_drafting_equals_batch_1_greedy(make_pipeline, head_text_tokens):
    """A flow head that reads text states gets them from verification passes of several tokens here, and
    must draw the same pictures."""
    pipe = make_pipeline("qwen2", image_scale=6.0, head_text_tokens=head_text_tokens)
    pipe.drafter = random_head(pipe)
    picture = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    prompts = [["draw a red circle."], [picture, " what colour is it?"], ["tell a story about a square."],
               ["a blue triangle"]]
    singles = []
    for k, prompt in enumerate(prompts):
        out = pipe([prompt], generator=seeded(base=5 + k), **GREEDY)
        singles.append(signature(out.segments[0]))
    _, truth = plain_tokens(pipe, prompts, **GREEDY)
    for drafter in ("ngram", "vision-head", Oracle(truth), Oracle(truth, middle=True, tree=True),
                    VisionHeadDrafter(pipe.drafter, pipe.unified, siblings=2)):
        out = pipe(prompts, drafter=drafter, generator=seeded(len(prompts)), **GREEDY)
        assert same_rows(out.segments, singles), f"{drafter} in a batch changed a row"


@pytest.mark.parametrize("spec", ["pool:2", "merge:4", "prune-attn:4", "dct:2"])
def test_drafting_composes_with_compression_of_context_images(make_pipeline, spec):
    """With context images compressed (given and drawn ones), every drafter still leaves greedy output as
    plain decoding under the same compression gives it, in a batch."""
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe.drafter = random_head(pipe)
    red = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    blue = PIL.Image.new("RGB", (16, 16), (30, 30, 200))
    prompts = [[red, " what colour is it?"], ["a story.", blue, " then", red, " and then"], ["tell a story."]]
    kwargs = {**GREEDY, "compression": spec}
    plain, truth = plain_tokens(pipe, prompts, **kwargs)
    assert pipe.last_stats.tokens_per_context_image == pipe.model.compressor.num_tokens(spec) < pipe.model.compressor.num_tokens("none")
    for drafter in ("ngram", "vision-head", Oracle(truth)):
        out = pipe(prompts, drafter=drafter, generator=seeded(len(prompts)), **kwargs)
        assert same_rows(out.segments, plain), f"{drafter} changed the output under {spec}"
    assert pipe.last_stats.accepted_tokens > 0  # the oracle's drafts were verified and taken


# -- drafters --------------------------------------------------------------------------------------------
def update_of(tokens: list[int]) -> ContextUpdate:
    return ContextUpdate(ids=tokens, positions=list(range(len(tokens))), modality=[TEXT] * len(tokens))


def test_ngram_drafts_by_prompt_lookup_and_adapts_its_length():
    from mmgen.drafting import DraftRequest

    drafter = NgramDrafter(initial_tokens=3, max_tokens=6)
    drafter.start(1, Sampling())
    drafter.extend(0, update_of([10, 11, 12, 13, 14, 15, 20, 10, 11]))
    request = DraftRequest(row=0, pending=12, position=9, max_tokens=10)
    assert drafter.propose([request])[0].tokens == [13, 14, 15]
    drafter.feedback(0, drafted=3, accepted=3)
    assert drafter.propose([request])[0].tokens == [13, 14, 15, 20, 10]
    drafter.feedback(0, drafted=5, accepted=1)
    drafter.feedback(0, drafted=4, accepted=0)
    assert len(drafter.propose([request])[0].tokens) == 3


def test_ngram_remembers_earlier_outputs_across_calls():
    from mmgen.drafting import DraftRequest

    drafter = NgramDrafter()
    drafter.start(1, Sampling())
    drafter.extend(0, update_of([1, 2]))  # the prompt
    drafter.extend(0, update_of([30, 31, 32, 33]))  # the answer
    drafter.finish()
    drafter.start(1, Sampling())
    drafter.extend(0, update_of([5, 6]))
    assert drafter.propose([DraftRequest(0, pending=31, position=2, max_tokens=4)])[0].tokens[:1] == []
    drafter.extend(0, update_of([30]))
    assert drafter.propose([DraftRequest(0, pending=31, position=3, max_tokens=4)])[0].tokens == [32, 33]


def test_draft_lm_loads_from_a_folder_and_must_share_the_tokenizer(make_pipeline, tokenizer, tmp_path):
    pipe = make_pipeline("llama")
    small = tiny_backbone("gpt2", tokenizer, seed=4)
    small.save_pretrained(tmp_path / "lm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "lm")
    plain = pipe("a red circle.", max_new_tokens=12, max_images=0).text
    assert pipe("a red circle.", max_new_tokens=12, max_images=0, drafter=f"draft-lm:{tmp_path / 'lm'}").text == plain
    other = tokenizer.__class__.from_pretrained(tmp_path / "lm")
    other.add_tokens(["<|something_else|>"])
    other.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="tokenizer"):
        DraftLMDrafter.from_folder(tmp_path / "lm", pipe.tokenizer)
    with pytest.raises(ValueError, match="draft-lm"):
        pipe("a red circle.", max_new_tokens=4, drafter="draft-lm")


def test_unknown_drafter_names_are_rejected_listing_the_known_ones(make_pipeline):
    pipe = make_pipeline("llama")
    with pytest.raises(ValueError, match="unknown drafter 'eagle'; known: ngram, draft-lm, vision-head"):
        pipe("a red circle.", drafter="eagle")
    with pytest.raises(ValueError, match="train-drafter"):
        pipe("a red circle.", drafter="vision-head")
    with pytest.raises(ValueError, match="drafter must be"):
        pipe("a red circle.", drafter=3)


# -- the vision head -------------------------------------------------------------------------------------
def test_vision_head_follows_the_target_incrementally_as_in_training(make_pipeline):
    """The head's features while decoding equal its teacher-forced features over the same stream."""
    pipe = make_pipeline("llama", image_scale=6.0)
    head = random_head(pipe)
    trace = generate_traces(pipe, [[Text("tell a story.")]], DrafterTrainArguments(
        max_new_tokens=16, num_inference_steps=1, generation_batch_size=1, max_images=1))[0]
    assert 2 in trace.modality, "the sample should hold an image"
    drafter = VisionHeadDrafter(head, pipe.unified)
    drafter.start(1, Sampling())
    update = trace.update()
    cut = len(update.ids) - 3
    drafter.extend(0, ContextUpdate(update.ids[:cut], update.positions[:cut], update.modality[:cut],
                                    update.hidden[:cut]))
    drafter.propose([DraftRequest(0, pending=update.ids[cut], position=update.positions[cut], max_tokens=1)])
    walker = ItemWalker(True)
    items = walker.feed(ContextUpdate(update.ids[:cut], update.positions[:cut], update.modality[:cut],
                                      update.hidden[:cut])) + [walker.pending(update.ids[cut])]
    x, positions = head.embed_items(items, pipe.unified.text_embeddings, {})
    n = len(x)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    _, keys, _ = head(x[None], positions[None], causal[None])
    assert torch.allclose(drafter.caches[0].view()[0], keys[0], atol=1e-5)


def test_drafting_runs_the_heads_layer_as_the_head_computes_it_for_rows_of_any_length(make_pipeline):
    """`DecodingLayer` folds the head's weights for drafting: rows of different lengths in one call, and a
    draft step on top of their caches, get what the head's own forward gives each row alone."""
    pipe = make_pipeline("llama")
    head = random_head(pipe).eval()
    model = pipe.unified
    embed, lm_head = model.backbone.get_input_embeddings(), model.backbone.get_output_embeddings()
    d = head.config.hidden_size
    torch.manual_seed(1)
    with torch.no_grad():
        for norm in (head.attn_norm, head.mlp_norm, head.final_norm):  # scales to fold, not ones
            norm.weight.uniform_(0.5, 1.5)
        layer = head.decoding_layer(embed, lm_head)
        xs, positions = [torch.randn(5, d), torch.randn(2, d)], [torch.arange(3, 8), torch.arange(2)]
        caches = [RowCache(), RowCache()]
        ingested = layer.run(torch.cat(xs), torch.cat(positions), caches, [5, 2], true=True).split([5, 2])
        step = torch.randn(2, d)
        stepped = layer.run(step, torch.tensor([8, 2]), caches, [1, 1], true=False)
        for b, (x, pos) in enumerate(zip(xs, positions)):
            n = len(x)
            causal = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
            expected, keys, _ = head(torch.cat([x, step[b : b + 1]])[None], torch.cat([pos, pos[-1:] + 1])[None],
                                     causal[None])
            torch.testing.assert_close(ingested[b], expected[0, :n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(stepped[b], expected[0, n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(caches[b].view()[0], keys[0], atol=1e-5, rtol=1e-4)

        features, tokens, image = torch.randn(3, d), torch.tensor([4, 7, 9]), torch.randn(3, d)
        torch.testing.assert_close(layer.inputs(features, tokens, image),
                                   head.pair_inputs(features, embed(tokens), image), atol=1e-5, rtol=1e-4)
        banned = Sampling(banned=(1, 2))
        torch.testing.assert_close(layer.logits(features, layer.logit_bias(banned.banned)),
                                   banned.mask(model.logits(features)), atol=1e-5, rtol=1e-4)

        assert head.decoding_layer(embed, lm_head) is layer, "folded once per set of weights"
        head.out.weight.mul_(2)  # as a training step would change it
        refolded = head.decoding_layer(embed, lm_head)
        assert refolded is not layer and torch.allclose(refolded.out, 2 * layer.out)


def test_vision_head_trains_and_drafts_with_tau_above_one(make_pipeline):
    pipe = make_pipeline("llama", image_scale=6.0)
    picture = PIL.Image.new("RGB", (16, 16), (30, 30, 200))
    prompts = [[Image(picture), Text(" what colour is it?")], [Text("tell a story about a circle.")]]
    args = DrafterTrainArguments(max_new_tokens=16, num_inference_steps=1, generation_batch_size=2, max_images=1,
                                 steps=25, batch_size=2, learning_rate=1e-2, warmup_steps=3, num_heads=4,
                                 intermediate_size=64, unroll=2, feature_noise=0.0)
    traces = generate_traces(pipe, prompts, args)
    model = pipe.unified
    embed, lm_head = model.backbone.get_input_embeddings(), model.backbone.get_output_embeddings()
    head = random_head(pipe)
    with torch.enable_grad():
        before, _ = head_batch_loss(head, traces, embed, lm_head, args, pipe.codec.ids.image_start)
        train_head(pipe, traces, args, head=head)
        after, _ = head_batch_loss(head, traces, embed, lm_head, args, pipe.codec.ids.image_start)
    assert after.item() < before.item()
    result = measure_tau(pipe, prompts, VisionHeadDrafter(head.eval(), pipe.unified), args)
    assert result["tau"] > 1.0 and result["acceptance"] > 0


def test_pipeline_with_a_vision_head_round_trips_save_and_load(make_pipeline, tmp_path):
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe.register_modules(drafter=random_head(pipe, seed=2))
    first = pipe("a story.", drafter="vision-head", generator=seeded(), **GREEDY)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["drafter"] == ["mmgen.drafting",
                                                                                "VisionDraftHead"]
    loaded = MMGenPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.drafter, VisionDraftHead)
    for name, value in pipe.drafter.state_dict().items():
        assert torch.equal(value, loaded.drafter.state_dict()[name]), name
    second = loaded("a story.", drafter="vision-head", generator=seeded(), **GREEDY)
    assert same_rows(first.segments, [signature(r) for r in second.segments])
    assert not list(tmp_path.rglob("*.bin"))


def test_train_drafter_saves_heads_into_the_model_folder_reusing_traces_of_the_same_target_only(
        make_pipeline, tmp_path, caplog):
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe.save_pretrained(tmp_path / "model")
    args = DrafterTrainArguments(model=str(tmp_path / "model"), samples=2, max_new_tokens=8, num_inference_steps=1,
                                 generation_batch_size=2, steps=2, batch_size=2, num_heads=4, intermediate_size=32,
                                 eval_samples=1, data_cache=str(tmp_path / "samples.safetensors"))
    (tmp_path / "model" / "training_state.json").write_text(json.dumps({"step": 9, "recipe": "configs/tiny.yaml"}))
    write_model_card(tmp_path / "model", [], "configs/tiny.yaml", 9)
    folder = train_drafter(args)
    assert folder == tmp_path / "model" / "drafter"
    assert not (tmp_path / "model" / "drafter.checkpoint").exists(), "the finished training's checkpoint goes"
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- `drafter/`: the vision-aware draft head" in card and "`mmgen train configs/tiny.yaml`" in card
    loaded = MMGenPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.drafter, VisionDraftHead) and loaded.drafter.config.image_adaptor
    with caplog.at_level(logging.INFO, logger="mmgen.draft_training"):
        ablation = train_drafter(DrafterTrainArguments(**{**args.__dict__, "image_adaptor": False}))
    assert ablation == tmp_path / "model" / "drafter_no_adaptor"
    assert "- `drafter_no_adaptor/`: the draft head without image adaptor" in (tmp_path / "model" / "README.md").read_text()
    assert not VisionDraftHead.from_pretrained(str(ablation)).config.image_adaptor
    assert "read 2 generated traces" in caplog.text  # the same target: its traces are reused
    # A changed target does not train on the traces of the old one.
    with torch.no_grad():
        next(loaded.backbone.parameters()).add_(0.01)
    loaded.save_pretrained(tmp_path / "model")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmgen.draft_training"):
        train_drafter(args)
    assert "generated by another target or recipe" in caplog.text and "read 2" not in caplog.text


def test_traces_stay_valid_when_the_resampler_changes_and_only_then(make_pipeline):
    from mmgen.draft_training import trace_key
    from mmgen.model import RESAMPLER_PREFIX

    pipe = make_pipeline("llama", resampler_queries=[4, 2])
    args = DrafterTrainArguments(samples=2)
    key = trace_key(pipe, args)
    with torch.no_grad():
        for name, weight in pipe.model.named_parameters():
            if name.startswith(RESAMPLER_PREFIX):
                weight.add_(1.0)
    assert trace_key(pipe, args) == key, "traces are generated uncompressed: the resampler does not shape them"
    with torch.no_grad():
        pipe.model.flow_head.out.weight.add_(0.01)
    assert trace_key(pipe, args) != key


def test_a_drafter_starts_from_a_saved_one_of_the_same_shape_only(make_pipeline, tmp_path):
    pipe = make_pipeline("llama", image_scale=6.0)
    pipe.save_pretrained(tmp_path / "model")
    base = dict(model=str(tmp_path / "model"), samples=2, max_new_tokens=8, num_inference_steps=1,
                generation_batch_size=2, steps=2, batch_size=2, num_heads=4, intermediate_size=32, eval_samples=1,
                draft_lm_hidden_size=32, draft_lm_heads=2, draft_lm_layers=1,
                data_cache=str(tmp_path / "samples.safetensors"))
    for kind, build in (("vision-head", build_head), ("draft-lm", build_draft_lm)):
        saved = train_drafter(DrafterTrainArguments(**base, kind=kind, output_dir=str(tmp_path / kind)))
        weights = load_file(str(next(saved.glob("*.safetensors"))))
        fresh = build(pipe, DrafterTrainArguments(**base, kind=kind, seed=1)).state_dict()
        started = build(pipe, DrafterTrainArguments(**base, kind=kind, seed=1, init_from=str(saved))).state_dict()
        assert any(not torch.equal(fresh[k], weights[k]) for k in weights), "a fresh drafter differs from the saved"
        assert all(torch.equal(started[k], weights[k]) for k in weights), kind
    with pytest.raises(ValueError, match=r"another shape \(adaptor_\S+: missing in the recipe"):
        build_head(pipe, DrafterTrainArguments(**base, image_adaptor=False, init_from=str(tmp_path / "vision-head")))
    with pytest.raises(ValueError, match="init_from: no drafter folder at"):
        train_drafter(DrafterTrainArguments(**base, init_from=str(tmp_path / "nowhere")))


def test_an_interrupted_trace_generation_resumes_after_its_saved_parts(make_pipeline, tmp_path, monkeypatch):
    import mmgen.draft_training as draft_training

    class Killed(Exception):
        pass

    pipe = make_pipeline("llama", image_scale=6.0)
    prompts = [[Text(f"tell a story about {n} circles.")] for n in range(5)]
    args = DrafterTrainArguments(max_new_tokens=8, num_inference_steps=1, generation_batch_size=1, max_images=1)
    unbroken = generate_traces(pipe, prompts, args)
    monkeypatch.setattr(draft_training, "SHARD_SAMPLES", 2)
    calls, killed = [], []
    real_call = type(pipe).__call__

    def failing_call(self, chunk, **kwargs):
        calls.append(chunk)
        if len(calls) == 4 and not killed:  # the run is killed once, in its fourth batch
            killed.append(True)
            raise Killed
        return real_call(self, chunk, **kwargs)

    parts = tmp_path / "traces.safetensors.parts"
    monkeypatch.setattr(type(pipe), "__call__", failing_call)
    with pytest.raises(Killed):
        generate_traces(pipe, prompts, args, parts, key="k")
    assert [p.name for p in sorted(parts.iterdir())] == ["0000000.safetensors"]  # the first two prompts
    calls.clear()
    resumed = generate_traces(pipe, prompts, args, parts, key="k")
    assert calls == [[p] for p in prompts[2:]]  # only what the first run had not saved
    assert len(resumed) == len(unbroken)
    for got, want in zip(resumed, unbroken):
        assert got.ids == want.ids and got.positions == want.positions and got.modality == want.modality
        assert torch.allclose(got.hidden.float(), want.hidden.float())
    # Parts saved under another key (another target or recipe) are not used.
    calls.clear()
    generate_traces(pipe, prompts, args, parts, key="other")
    assert calls == [[p] for p in prompts]


@pytest.mark.parametrize("kind", ["vision-head", "draft-lm"])
def test_an_interrupted_drafter_training_resumes_from_its_checkpoint_as_an_unbroken_run(
        make_pipeline, tmp_path, monkeypatch, kind):
    pipe = make_pipeline("llama", image_scale=6.0)
    picture = PIL.Image.new("RGB", (16, 16), (30, 200, 30))
    prompts = [[Image(picture), Text(" what colour is it?")], [Text("tell a story about a square.")]]
    args = DrafterTrainArguments(max_new_tokens=8, num_inference_steps=1, generation_batch_size=2, max_images=1,
                                 steps=7, save_every=3, batch_size=1, learning_rate=1e-2, warmup_steps=2,
                                 num_heads=4, intermediate_size=32, draft_lm_hidden_size=16, draft_lm_heads=2,
                                 draft_lm_layers=1)
    traces = generate_traces(pipe, prompts, args)

    def train(checkpoint=None, key="k"):
        with torch.enable_grad():
            if kind == "draft-lm":
                return train_draft_lm(pipe, traces, args, checkpoint=checkpoint, key=key)
            return train_head(pipe, traces, args, checkpoint=checkpoint, key=key)

    class Killed(Exception):
        pass

    unbroken = train().state_dict()
    steps, kills, real_step = [], [], torch.optim.AdamW.step

    def killed_at_step_5(self, *a, **kw):
        steps.append(True)
        if len(steps) == 5 and not kills:
            kills.append(True)  # killed once, in its fifth step
            raise Killed
        return real_step(self, *a, **kw)

    checkpoint = tmp_path / "drafter.checkpoint"
    monkeypatch.setattr(torch.optim.AdamW, "step", killed_at_step_5)
    with pytest.raises(Killed):
        train(checkpoint)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 3
    steps.clear()
    resumed = train(checkpoint).state_dict()
    assert len(steps) == 4, "steps 4 to 7 only"
    for name, tensor in unbroken.items():
        assert torch.equal(resumed[name], tensor), name
    # A checkpoint of another target or recipe is not resumed from.
    steps.clear()
    train(checkpoint, key="other")
    assert len(steps) == 7


def test_train_drafter_command_rejects_an_unknown_kind(capsys):
    from mmgen.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "drafter.yaml")
    assert main(["train-drafter", config, "--kind", "tree"]) == 2
    assert "unknown drafter kind 'tree'; known: vision-head, draft-lm" in capsys.readouterr().err


def test_drafting_bench_case_runs_quick_and_reports_its_ratios(make_pipeline, tmp_path):
    from mmgen.evals.bench import BenchOptions, run_bench

    pipe = make_pipeline("llama", image_scale=6.0)
    (result,) = run_bench(["drafting"], pipe, BenchOptions(repeats=1, quick=True, out_dir=tmp_path))
    assert set(result.ratios) == {"vision_head_tau", "vision_head_speedup", "vision_head_decode_speedup",
                                  "vision_head_tau_vs_no_adaptor",
                                  "best_vs_hf_assisted", "best_vs_hf_prompt_lookup", "batch4_drafting_vs_plain"}
    grounded = [row for row in result.rows if row["workload"] != "text-only"]
    assert all(row["identical_to_plain"] == 1.0 for row in grounded), "drafting must not change greedy output"
    assert {"vision-head", "vision-head (tree)"} <= {r["drafter"] for r in grounded}, "a chain, beside its tree"
    assert next(r for r in result.rows if r["drafter"] == "hf plain")["matches_ours"] == 1.0
    plain = next(r for r in grounded if r["drafter"] == "plain")
    assert all(plain[f"tau_{kind}"] == 1.0 for kind in ("caption", "qa", "story")), plain
    ceiling = next(r for r in grounded if r["drafter"].startswith("ceiling"))
    assert ceiling["acceptance"] == 1.0, "replaying plain decoding's output, every drafted token is accepted"
    assert ceiling["tau"] >= max(r["tau"] for r in grounded if r["workload"] == "grounded"), result.rows


def test_grounded_bench_prompts_are_captions_questions_and_story_steps_in_equal_parts():
    from mmgen.evals.bench_drafting import grounded_prompts
    from mmgen.segments import Image

    prompts = grounded_prompts(12, seed=0, image_size=32)
    assert [kind for kind, _ in prompts] == ["caption", "qa", "story"] * 4
    for kind, prompt in prompts:
        pictures = sum(isinstance(s, Image) for s in prompt)
        assert pictures == 1 if kind != "story" else pictures >= 1, (kind, prompt)
    questions = [prompt[-1].text for kind, prompt in prompts if kind == "qa"]
    assert len(set(questions)) == 4 and any("how many" in q for q in questions) and any("color" in q for q in questions)


def test_grounded_bench_stories_may_draw_every_picture_they_have_left():
    from mmgen.evals.bench_drafting import grounded_settings
    from mmgen.shapesworld.tasks import MAX_STEPS

    for quick in (True, False):  # a continued story was given at least one of its MAX_STEPS pictures
        assert grounded_settings(quick)["max_images"] >= MAX_STEPS - 1


def test_the_drafting_bench_calls_outputs_identical_by_tokens_and_pictures():
    from mmgen.evals.bench_drafting import IMAGE_TOLERANCE

    latent = torch.randn(4, 8, 8)
    plain = ("a red circle.", latent, " then a square.")
    assert _identical(plain, ("a red circle.", latent + IMAGE_TOLERANCE / 10, " then a square."))
    assert not _identical(plain, ("a red circle.", latent, " then a star."))
    assert not _identical(plain, ("a red circle.", latent + 0.1, " then a square."))
    assert not _identical(plain, ("a red circle.", latent))
