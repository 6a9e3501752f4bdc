"""The torch T3 backend on CPU: guidance, batching, streaming, stop handling and cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import T3BatchDecoder, TorchT3Backend
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .t3_checkpoint import write_scripted_t3_checkpoint

pytestmark = pytest.mark.torch

TEXT = "Hello there, how are you today?"


def make_conds(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "speaker_emb": torch.randn(1, 256, generator=gen),
        "clap_emb": None,
        "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, 150), generator=gen),
        "cond_prompt_speech_emb": None,
        "emotion_adv": 0.5 * torch.ones(1, 1, 1),
    }


def request(rid: str, **kw) -> T3Request:
    defaults = dict(text=TEXT, conditionals=make_conds(1), max_new_tokens=12, seed=7)
    return T3Request(rid, **{**defaults, **kw})


def run_decoder(
    decoder: T3BatchDecoder, requests: list[T3Request], prefill_together: bool = False
) -> dict[str, list]:
    """Add all requests (one by one, or in one prefill pass), then step until all finish.

    Returns:
        Each request's outputs.
    """
    outs: dict[str, list] = {r.request_id: [] for r in requests}
    with torch.inference_mode():
        firsts = decoder.add_batch(requests) if prefill_together else map(decoder.add, requests)
        for r, out in zip(requests, firsts, strict=True):
            outs[r.request_id].append(out)
        while decoder.active_ids:
            for out in decoder.step():
                outs[out.request_id].append(out)
    return outs


# ---------------------------------------------------------------- guidance


def reference_logits(model: T3Model, req: T3Request, ids: list[int], tokens: list[int]):
    """Conditional and unconditional logits after ``tokens``, each from its own full pass.

    The sequences are laid out by hand, as upstream's inference does: conditioning, text
    (+ learned text positions; zeroed text, positions kept, for the unconditional row),
    start-of-speech at speech position 0 twice, then each generated token at position i + 1.
    """
    with torch.inference_mode():
        conds = req.conditionals
        cond = model.conditioning(
            conds["speaker_emb"], conds["cond_prompt_speech_tokens"], req.exaggeration
        )
        text_ids = torch.tensor(ids)
        text_pos = model.text_pos_emb.emb.weight[: len(ids)]
        text_c = model.text_emb.weight[text_ids] + text_pos
        text_u = text_pos
        bos = model.speech_emb.weight[6561] + model.speech_pos_emb.emb.weight[0]
        speech = [
            model.speech_emb.weight[t] + model.speech_pos_emb.emb.weight[i + 1]
            for i, t in enumerate(tokens)
        ]
        tail = torch.stack([bos, bos, *speech])
        seq_c = torch.cat([cond, text_c, tail])
        seq_u = torch.cat([cond, text_u, tail])
        h_c = model.forward_full(seq_c[None])[0, -1]
        h_u = model.forward_full(seq_u[None])[0, -1]
        return model.logits(h_c), model.logits(h_u)


def test_cfg_step_matches_separate_cond_and_uncond_passes(model, tokenizer):
    decoder = T3BatchDecoder(
        model, tokenizer, max_batch_size=3, max_seq_len=256, record_logits=True
    )
    guided = request("guided", cfg_weight=0.5, max_new_tokens=6)
    # A second request decoded alongside, with other text, voice and guidance weight.
    other = request(
        "other",
        text="Something else entirely.",
        conditionals=make_conds(2),
        cfg_weight=1.3,
        seed=3,
        max_new_tokens=6,
    )
    outs = run_decoder(decoder, [other, guided])
    for req in (guided, other):
        ids = tokenizer.encode(req.text)
        tokens = [o.token for o in outs[req.request_id]]
        assert len(tokens) == 6
        for step, out in enumerate(outs[req.request_id]):
            cond, uncond = reference_logits(model, req, ids, tokens[:step])
            assert (cond - uncond).abs().max() > 1e-3  # guidance has something to do
            expected = cond + req.cfg_weight * (cond - uncond)
            torch.testing.assert_close(out.logits, expected, atol=2e-4, rtol=1e-4)


def test_no_guidance_uses_conditional_logits_and_one_slot(model, tokenizer):
    decoder = T3BatchDecoder(
        model, tokenizer, max_batch_size=1, max_seq_len=256, record_logits=True
    )
    plain = request("plain", cfg_weight=0.0, max_new_tokens=4)
    assert decoder.slots_needed(plain) == 1
    with torch.inference_mode():
        first = decoder.add(plain)
        assert decoder.free_slots == 1
        second = decoder.step()[0]
    ids = tokenizer.encode(plain.text)
    for step, out in enumerate([first, second]):
        cond, _ = reference_logits(model, plain, ids, [first.token][:step])
        torch.testing.assert_close(out.logits, cond, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- batching


def test_batched_decoding_matches_each_request_alone(model, tokenizer):
    reqs = [
        request("a", seed=1, max_new_tokens=10),
        request(
            "b",
            text="A much longer sentence, so the prompts differ in length.",
            conditionals=make_conds(5),
            seed=2,
            temperature=1.0,
            top_p=0.9,
            max_new_tokens=14,
        ),
        request(
            "c", text="Short.", cfg_weight=0.0, seed=3, repetition_penalty=2.0, max_new_tokens=8
        ),
    ]
    alone = {}
    for r in reqs:
        decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, max_seq_len=256)
        alone.update(run_decoder(decoder, [r]))
    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=3, max_seq_len=256)
    together = run_decoder(decoder, reqs)
    for r in reqs:
        solo = [o.token for o in alone[r.request_id]]
        assert [o.token for o in together[r.request_id]] == solo
        assert len(solo) == r.max_new_tokens or solo[-1] == 6562
    assert decoder.free_slots == 6  # everyone left and gave their slots back


def test_seed_reproduces_and_distinguishes(model, tokenizer):
    def tokens(seed: int) -> list[int]:
        decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, max_seq_len=256)
        outs = run_decoder(decoder, [request("r", seed=seed, max_new_tokens=10)])
        return [o.token for o in outs["r"]]

    assert tokens(11) == tokens(11)
    assert tokens(11) != tokens(12)


async def collect(backend: TorchT3Backend, req: T3Request) -> list[int]:
    out: list[int] = []
    async for delta in backend.generate(req):
        assert delta, "empty delta"
        out.extend(delta)
    return out


async def test_backend_streams_concurrent_requests_like_alone(t3_dir, model, tokenizer):
    reqs = [
        request(f"r{i}", seed=i, conditionals=make_conds(i), max_new_tokens=9) for i in range(3)
    ]
    expected = {}
    for r in reqs:
        decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, max_seq_len=256)
        tokens = [o.token for o in run_decoder(decoder, [r])[r.request_id]]
        expected[r.request_id] = [t for t in tokens if t < 6561]
    backend = TorchT3Backend(t3_dir, device="cpu", max_batch_size=2, max_seq_len=256)
    await backend.start()
    try:
        # Three requests, room for two: the third waits for a place, then joins.
        results = await asyncio.gather(*(collect(backend, r) for r in reqs))
    finally:
        await backend.close()
    for r, got in zip(reqs, results, strict=True):
        assert got == expected[r.request_id]
        assert all(0 <= t < 6561 for t in got)


# ---------------------------------------------------------------- stop, budget, invalid ids


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 6563 and 6561-and-up are not speech: never delivered; 6562 stops; 44 is never reached.
    script = [11, 22, 6563, 33, 8000, 6562, 44]
    return write_scripted_t3_checkpoint(tmp_path_factory.mktemp("t3s"), script, n_layers=1)


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
async def test_stop_token_ends_and_invalid_ids_are_dropped(scripted_dir, cfg_weight):
    backend = TorchT3Backend(scripted_dir, max_batch_size=2, max_seq_len=256)
    await backend.start()
    try:
        deltas = [
            d
            async for d in backend.generate(request("s", cfg_weight=cfg_weight, max_new_tokens=50))
        ]
    finally:
        await backend.close()
    assert sum(deltas, []) == [11, 22, 33]


async def test_budget_cuts_generation(scripted_dir):
    backend = TorchT3Backend(scripted_dir, max_batch_size=1, max_seq_len=256)
    await backend.start()
    try:
        assert await collect(backend, request("b", max_new_tokens=2)) == [11, 22]
        # The budget counts sampled ids, delivered or not (6563 is the third).
        assert await collect(backend, request("c", max_new_tokens=4)) == [11, 22, 33]
    finally:
        await backend.close()


async def test_prompt_longer_than_a_slot_fails_the_request(t3_dir):
    backend = TorchT3Backend(t3_dir, max_batch_size=1, max_seq_len=64)
    await backend.start()
    try:
        with pytest.raises(ValueError, match="max_seq_len"):
            await collect(backend, request("long", text="word " * 60))
        # The backend keeps serving.
        assert len(await collect(backend, request("ok", text="Hi.", max_new_tokens=3))) <= 3
    finally:
        await backend.close()


# ---------------------------------------------------------------- cancellation


async def wait_idle(backend: TorchT3Backend, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while backend.decoder.active_ids:
        assert asyncio.get_running_loop().time() < deadline, "request still decoding"
        await asyncio.sleep(0.01)


async def test_closing_the_stream_aborts_the_request(t3_dir):
    backend = TorchT3Backend(t3_dir, max_batch_size=2, max_seq_len=512)
    await backend.start()
    try:
        stream = backend.generate(request("long", max_new_tokens=400))
        other = asyncio.create_task(collect(backend, request("other", max_new_tokens=15)))
        got = []
        async for delta in stream:
            got.extend(delta)
            if len(got) >= 3:
                break
        await stream.aclose()
        assert len(await other) <= 15  # the neighbour finishes normally
        await wait_idle(backend)
        assert backend.decoder.free_slots == 4
    finally:
        await backend.close()


async def test_cancelling_the_consumer_aborts_the_request(t3_dir):
    backend = TorchT3Backend(t3_dir, max_batch_size=1, max_seq_len=512)
    await backend.start()
    try:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in backend.generate(request("c", max_new_tokens=400)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(backend)
        # A queued request that is closed before it gets a place never runs.
        blocker = backend.generate(request("blocker", max_new_tokens=400))
        queued = backend.generate(request("queued", max_new_tokens=400))
        await queued.aclose()
        await blocker.__anext__()
        await blocker.aclose()
        await wait_idle(backend)
        assert backend.decoder.free_slots == 2
        # ... and the backend still serves.
        assert len(await collect(backend, request("after", max_new_tokens=3))) <= 3
    finally:
        await backend.close()


def test_prefilling_together_matches_adding_one_by_one(model, tokenizer):
    # Prompts of three lengths, one without guidance, share one right-padded prefill pass.
    reqs = [
        request("a", seed=1, max_new_tokens=6),
        request(
            "b",
            text="A much longer sentence, so that the prompts differ in length.",
            conditionals=make_conds(5),
            seed=2,
            max_new_tokens=6,
        ),
        request("c", text="Short.", cfg_weight=0.0, seed=3, max_new_tokens=6),
    ]
    one_by_one = T3BatchDecoder(model, tokenizer, max_batch_size=3, record_logits=True)
    want = run_decoder(one_by_one, reqs)
    together = T3BatchDecoder(model, tokenizer, max_batch_size=3, record_logits=True)
    got = run_decoder(together, reqs, prefill_together=True)
    for r in reqs:
        assert [o.token for o in got[r.request_id]] == [o.token for o in want[r.request_id]]
        for a, b in zip(got[r.request_id], want[r.request_id], strict=True):
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_a_bad_request_in_a_prefill_batch_fails_alone(model, tokenizer):
    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=1, max_seq_len=64)
    results = decoder.add_batch(
        [
            request("long", text="word " * 200, max_new_tokens=4),
            request("ok", max_new_tokens=4),
            request("ok", max_new_tokens=4),  # duplicate id
            request("third", max_new_tokens=4),  # slots: one guided request fits
        ]
    )
    assert isinstance(results[0], ValueError) and "max_seq_len" in str(results[0])
    assert results[1].request_id == "ok" and results[1].token >= 0
    assert isinstance(results[2], ValueError) and "already running" in str(results[2])
    assert isinstance(results[3], ValueError) and "slots" in str(results[3])
    assert decoder.active_ids == ["ok"] and decoder.free_slots == 0


class HostTensorCheck(TorchDispatchMode):
    """Records every op that reads a tensor made on the host during the ops it watches.

    A CUDA graph records device work only: a tensor the step makes from host data (the Python
    ``True`` of ``x[i] = True``, a ``torch.tensor([...])``) is copied from the host, which
    capture forbids. Such a tensor comes from no dispatched op and from nothing that existed
    before the step, so its storage is unknown here, on any device. ``lift_fresh`` only wraps
    a fresh tensor and passes it on; a 0-dim one filled into a tensor (``x[:, 0] = False``)
    is allowed: on CUDA that fill takes the value as a kernel argument, with no copy.
    """

    def __init__(self, known: list[Tensor]):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.host_reads: list[str] = []
        self._outputs: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.lift_fresh.default:
            return out
        for t in pytree.tree_leaves((args, kwargs)):
            unknown = isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self.known
            if unknown and not (func is torch.ops.aten.fill_.Tensor and t.dim() == 0):
                self.host_reads.append(f"{func}: {tuple(t.shape)} {t.dtype}")
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.known.add(t.untyped_storage().data_ptr())
                self._outputs.append(t)  # kept alive: no later tensor can reuse its memory
        return out


def tensors_held_by(*objects) -> list[Tensor]:
    """Tensors the objects hold, directly or through the attributes of what they hold."""
    found: list[Tensor] = []
    visited: set[int] = set()
    pending = list(objects)
    while pending:
        obj = pending.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            pending += obj.values()
        elif isinstance(obj, list | tuple):
            pending += obj
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            pending += vars(obj).values()
    return found


def test_decode_step_reads_no_host_made_tensor(model, tokenizer):
    # The check sees the bug it is for: an index_put_ of a Python scalar.
    seen = torch.zeros(2, 4, dtype=torch.bool)
    index = torch.tensor([0, 1])
    with torch.inference_mode():
        with HostTensorCheck([seen, index]) as check:
            seen[:, -1] = False
        assert check.host_reads == []
        with HostTensorCheck([seen, index]) as check:
            seen[index, index] = True
    assert check.host_reads == ["aten.index_put_.default: () torch.bool"]

    decoder = T3BatchDecoder(model, tokenizer, max_batch_size=2, kv_bucket=64)
    with torch.inference_mode():
        decoder.add_batch([request("a", seed=1), request("b", cfg_weight=0.0, seed=2)])
        inputs = torch.tensor([[5, 6, 7, 0], [0, 0, 0, 0], [40, 41, 42, 0]])
        known = tensors_held_by(model, decoder, decoder.cache) + [inputs]
        with HostTensorCheck(known) as check:
            tokens, _ = decoder.decode_and_sample(inputs, 64)
    assert tokens.shape == (4,)
    assert check.host_reads == [], "\n".join(check.host_reads)


# ---------------------------------------------------------------- text checked before the GPU


def test_text_ids_outside_the_model_are_refused_on_the_host(tmp_path, tokenizer):
    # A checkpoint whose text embedding has 100 rows, beside the real 704-token tokenizer: an
    # id past row 99 would be a device-side assert on CUDA (IndexError here); it is refused
    # before any tensor is indexed.
    from .t3_checkpoint import _write, random_t3_state

    state = random_t3_state(n_layers=1, seed=3, hidden=128, intermediate=256)
    for key in ("text_emb.weight", "text_head.weight"):
        if key in state:
            state[key] = state[key][:100].contiguous()
    path = _write(tmp_path, state)
    small = T3Model.from_safetensors(path / "t3_cfg.safetensors", max_positions=256)
    assert small.config.text_vocab_size == 100
    decoder = T3BatchDecoder(small, tokenizer, max_batch_size=1, max_seq_len=256)
    with pytest.raises(ValueError, match="outside T3's text vocabulary"):
        with torch.inference_mode():
            decoder.add(request("r", text="Zebras quietly vex jumpy wizards."))
    assert not decoder.active_ids
    with pytest.raises(IndexError):  # what the guard keeps from the embedding (on CUDA: assert)
        small.text_emb(torch.tensor([255]))


def test_voice_conditioning_is_computed_once_per_voice_and_exaggeration(model, tokenizer):
    """The perceiver runs once per voice and exaggeration; cached rows give the same tokens."""
    voice_a, voice_b = make_conds(1), make_conds(2)
    reqs = [
        request("a1", conditionals=voice_a, seed=1),
        request("a2", conditionals=voice_a, seed=2),
        request("a3", conditionals=voice_a, seed=3, exaggeration=0.9),
        request("b1", conditionals=voice_b, seed=4),
        request("a4", conditionals=voice_a, seed=5),
    ]
    cached = T3BatchDecoder(model, tokenizer, max_batch_size=5, max_seq_len=256)
    calls = []
    original = model.conditioning

    def counting(speaker, prompt, exaggeration):
        calls.append((id(speaker), exaggeration))
        return original(speaker, prompt, exaggeration)

    model.conditioning = counting
    try:
        got = run_decoder(cached, reqs)
    finally:
        del model.conditioning
    assert sorted(set(calls)) == sorted(calls)  # never twice for the same key
    assert len(calls) == 3  # voice a at 0.5 and 0.9, voice b at 0.5
    # Each request alone, on a fresh decoder with fresh copies of its voice: same tokens.
    for r in reqs:
        fresh = T3BatchDecoder(model, tokenizer, max_batch_size=1, max_seq_len=256)
        copy = {k: v.clone() if torch.is_tensor(v) else v for k, v in r.conditionals.items()}
        alone = run_decoder(fresh, [dataclasses.replace(r, conditionals=copy)])
        assert [o.token for o in alone[r.request_id]] == [o.token for o in got[r.request_id]]
