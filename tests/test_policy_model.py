"""The VLA: exact log-probs, seeded sampling, save/load, the action codec, the offline tokenizer, BC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from policy_fixtures import make_checkpoint, observation

from wmpo.common.errors import UserError
from wmpo.common.tensors import Array
from wmpo.policy.actions import ActionCodec
from wmpo.policy.checkpoint import PolicyBundle, PolicyInputs, load_policy, save_policy
from wmpo.policy.tokenizer import build_byte_tokenizer, load_tokenizer
from wmpo.policy.train import BCConfig, train_bc


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> PolicyBundle:
    path: Path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "policy")
    return load_policy(path)


def _inputs(bundle: PolicyBundle, n: int = 3) -> PolicyInputs:
    obs = [observation(i) for i in range(n)]
    texts = ["press the button", "open the drawer", "reach the red goal", "push the puck"][:n]
    return bundle.prepare([o[0] for o in obs], [o[1] for o in obs], texts)


def test_sampled_logprobs_equal_a_fresh_forward(bundle: PolicyBundle) -> None:
    inputs = _inputs(bundle)
    for temperature in (0.0, 1.0, 1.6):
        out = bundle.act(inputs, [temperature] * 3, [1, 2, 3])
        fresh = bundle.logprobs(inputs, torch.from_numpy(out.tokens).long(), temperature).detach().numpy()
        assert np.abs(fresh - out.logprobs).max() <= 1e-5
        assert out.tokens.shape == (3, 8, 4) and out.actions.shape == (3, 8, 4)
        assert (out.logprobs <= 0).all()


def test_seeded_sampling_is_reproducible_and_batch_independent(bundle: PolicyBundle) -> None:
    inputs = _inputs(bundle)
    a = bundle.act(inputs, [1.6] * 3, [7, 8, 9])
    b = bundle.act(inputs, [1.6] * 3, [7, 8, 9])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    alone = bundle.act(_inputs(bundle, 1), [1.6], [7])  # row 0 without the rest of the batch
    np.testing.assert_array_equal(alone.tokens[0], a.tokens[0])
    other = bundle.act(inputs, [1.6] * 3, [70, 80, 90])
    assert not np.array_equal(other.tokens, a.tokens)
    greedy = bundle.act(inputs, [0.0] * 3, [None] * 3)
    np.testing.assert_array_equal(greedy.tokens, bundle.act(inputs, [0.0] * 3, [5, 6, 7]).tokens)


def test_save_then_load_gives_identical_outputs(bundle: PolicyBundle, tmp_path: Path) -> None:
    save_policy(bundle, tmp_path / "copy")
    again = load_policy(tmp_path / "copy")
    inputs = _inputs(bundle)
    torch.testing.assert_close(again.logits(again.prepare(*_raw())), bundle.logits(bundle.prepare(*_raw())))
    assert again.spec() == bundle.spec()
    with pytest.raises(UserError, match="is not a wmpo policy checkpoint"):
        load_policy(tmp_path)
    del inputs


def _raw() -> tuple[list[dict[str, Array]], list[Array], list[str]]:
    obs = [observation(i) for i in range(2)]
    return [o[0] for o in obs], [o[1] for o in obs], ["reach", "push"]


def test_action_codec_round_trips_within_half_a_bin(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.5, 2.0, (500, 4)).astype(np.float32)
    codec = ActionCodec.fit(actions, rng.normal(size=(500, 4)))
    tokens = codec.to_tokens(actions)
    assert tokens.min() >= 0 and tokens.max() <= 255
    inside = (actions >= np.asarray(codec.low)) & (actions <= np.asarray(codec.high))
    bin_width = (np.asarray(codec.high) - np.asarray(codec.low)) / 256
    error = np.abs(codec.to_actions(tokens) - actions)
    assert (error[inside] <= np.broadcast_to(bin_width / 2 + 1e-5, error.shape)[inside]).all()
    codec.save(tmp_path)
    assert ActionCodec.load(tmp_path) == codec


def test_tokenizer_works_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    ids = loaded("open the drawer, ça va", add_special_tokens=False).input_ids
    assert ids[:4] == list(b"open") and loaded.decode(ids) == "open the drawer, ça va"
    assert len(loaded) == 259


def test_bc_on_expert_data_lowers_validation_loss_and_resumes(tmp_path: Path) -> None:
    from wmpo.sim.rollout import run_many
    from wmpo.sim.sources import SourceSpec
    from wmpo.sim.tasks import get_task

    data = tmp_path / "data"
    list(run_many(get_task("reach"), SourceSpec("expert"), range(4), out_dir=data))
    out = tmp_path / "bc"
    first = train_bc(data, out, BCConfig(steps=24, eval_every=8, batch_size=16, val_fraction=0.25, warmup_steps=4))
    losses = [v for _s, v in first.val_losses]
    assert len(losses) == 3 and losses[-1] < losses[0]
    resumed = train_bc(data, out, BCConfig(steps=32, eval_every=8, batch_size=16, val_fraction=0.25, warmup_steps=4))
    assert [s for s, _v in resumed.val_losses] == [8, 16, 24, 32]
    assert load_policy(out).info["bc_steps"] == 32
    log = (out / "training" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4


MIXED = ["go", "press the button", "reach past the red goal, then press the big green button on the far wall"]


def trained_scale(bundle: PolicyBundle, seed: int = 0) -> PolicyBundle:
    """Every weight matrix redrawn at std 1/sqrt(fan-in), the scale of a trained model: the 0.02 init makes
    attention nearly uniform, which hides how much the positions matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bundle.model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return bundle


@pytest.fixture(scope="module")
def sharp(tmp_path_factory: pytest.TempPathFactory) -> PolicyBundle:
    return trained_scale(load_policy(make_checkpoint(tmp_path_factory.mktemp("sharp") / "policy")))


def _mixed(bundle: PolicyBundle, rows: list[int]) -> PolicyInputs:
    obs = [observation(20 + i) for i in rows]
    return bundle.prepare([o[0] for o in obs], [o[1] for o in obs], [MIXED[i] for i in rows])


def test_a_row_is_batch_invariant_across_instruction_lengths(sharp: PolicyBundle) -> None:
    """Issue 13: padding a shorter instruction must not move the action queries' positions."""
    bundle = sharp
    batch = _mixed(bundle, [0, 1, 2])
    assert batch.attention_mask.sum(1).tolist() == [3, 17, 48]  # bos + bytes, the longest cut at 48 tokens
    logits = bundle.logits(batch)
    tokens = torch.randint(0, 256, (3, 8, 4), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 1.0, 1.6):
        seeds = [11, 12, 13]
        together = bundle.act(batch, [temperature] * 3, seeds)
        batched_logps = bundle.logprobs(batch, tokens, temperature).detach()
        for row in range(3):
            single = _mixed(bundle, [row])
            torch.testing.assert_close(bundle.logits(single)[0], logits[row], atol=1e-5, rtol=0)
            alone_logps = bundle.logprobs(single, tokens[row : row + 1], temperature).detach()[0]
            assert (alone_logps - batched_logps[row]).abs().max() <= 1e-5
            alone = bundle.act(single, [temperature], [seeds[row]])
            np.testing.assert_array_equal(alone.tokens[0], together.tokens[row])
            np.testing.assert_array_equal(alone.actions[0], together.actions[row])
            assert np.abs(alone.logprobs[0] - together.logprobs[row]).max() <= 1e-5


def test_padding_side_and_padded_ids_do_not_matter(sharp: PolicyBundle) -> None:
    """The fix lives in the model: left padding, or garbage under the mask, gives the same logits."""
    bundle = sharp
    right = _mixed(bundle, [0, 1, 2])
    expected = bundle.logits(right)
    ids, mask = right.input_ids.clone(), right.attention_mask.clone()
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        ids[row] = torch.roll(right.input_ids[row], ids.shape[1] - n)
        mask[row] = torch.roll(right.attention_mask[row], ids.shape[1] - n)
    left = PolicyInputs(right.pixel_values, right.proprio, ids, mask)
    assert left.attention_mask[0, 0] == 0 and left.attention_mask[0, -1] == 1
    torch.testing.assert_close(bundle.logits(left), expected, atol=1e-5, rtol=0)
    garbage = right.input_ids.masked_fill(right.attention_mask == 0, 65)
    torch.testing.assert_close(
        bundle.logits(PolicyInputs(right.pixel_values, right.proprio, garbage, right.attention_mask)),
        expected,
        atol=1e-5,
        rtol=0,
    )
