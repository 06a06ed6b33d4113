"""The Selective Attention Layer against taipan-spec.md: selection, refinement, budget loss."""
import pytest
import torch
from hybridlab.blocks import Aux

from tests.helpers import D_MODEL, TINY, open_sal_gate, tiny_block

TINY_SAL = TINY["sal"]


def test_straight_through_gradient_reaches_gate():
    block = open_sal_gate(tiny_block("sal")).train()
    h = torch.randn(2, 17, D_MODEL)
    o = torch.randn(2, 17, D_MODEL)
    s = torch.randn(2, 17, 2, requires_grad=True)

    def grad_of_s(detach_m):
        torch.manual_seed(3)
        m = block.select(s)
        assert set(m.unique().tolist()) <= {0.0, 1.0}  # forward is hard 0/1
        if detach_m:
            m = m.detach()
        out = block.refine(h, o, torch.softmax(s, -1)[..., 1], m, m.detach() > 0.5)
        (g,) = torch.autograd.grad((out * o).sum(), s)
        return g

    with_st, without_st = grad_of_s(False), grad_of_s(True)
    assert with_st.abs().sum() > 0
    assert (with_st - without_st).abs().max() > 1e-4  # the hard m carries its own gradient


def test_gate_gets_gradient_from_lm_side_without_budget_loss():
    block = open_sal_gate(tiny_block("sal", budget_weight=0.0)).train()
    x = torch.randn(2, 16, D_MODEL)
    block(x, Aux()).pow(2).sum().backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0


def test_budget_loss_matches_eq7():
    C, lam = 0.25, 0.7
    block = tiny_block("sal", capacity=C, budget_weight=lam).train()
    m = torch.zeros(3, 20)
    m[0, :5] = 1  # 0.25 selected
    m[1, :12] = 1  # 0.60
    m[2, :1] = 1  # 0.05
    block.select = lambda s: m  # fix the selection, Eq. 7 is then arithmetic
    aux = Aux(scope="sal0")
    block(torch.randn(3, 20, D_MODEL), aux)
    expected = ((C - 0.25) ** 2 + (C - 0.60) ** 2 + (C - 0.05) ** 2) / 3
    assert aux.losses["sal0/budget_loss"].item() == pytest.approx(lam * expected, rel=1e-6)
    assert aux.metrics["sal0/selected_frac"].item() == pytest.approx((0.25 + 0.6 + 0.05) / 3)


@pytest.mark.parametrize("capacity", [0.1, 0.5, 0.85])
def test_selected_share_follows_capacity_under_budget_loss(capacity):
    """Train only the gate, only on Eq. 7: the sampled share must move to C."""
    torch.manual_seed(0)
    block = tiny_block("sal", capacity=capacity).train()
    with torch.no_grad():  # start far from C: about half selected
        block.gate.bias.zero_()
    opt = torch.optim.Adam(block.gate.parameters(), lr=0.05)
    x = torch.randn(4, 64, D_MODEL)
    for _ in range(150):
        aux = Aux()
        block(x, aux)
        opt.zero_grad()
        aux.total_loss().backward()
        opt.step()
    shares = []
    for _ in range(5):
        aux = Aux()
        with torch.no_grad():
            block(x, aux)
        shares.append(aux.metrics["block/selected_frac"].item())
    assert abs(sum(shares) / len(shares) - capacity) < 0.06


@pytest.mark.parametrize("temperature", [1.0, 0.25, 4.0])
def test_gate_init_aims_at_capacity(temperature):
    block = tiny_block("sal", capacity=0.2, temperature=temperature).train()
    x = torch.randn(8, 256, D_MODEL)
    aux = Aux()
    with torch.no_grad():
        block(x, aux)
    assert abs(aux.metrics["block/selected_frac"].item() - 0.2) < 0.05


def test_eval_selection_is_deterministic_threshold():
    block = open_sal_gate(tiny_block("sal", inference="threshold")).eval()
    x = torch.randn(2, 15, D_MODEL)
    s = block.gate(block.norm(x))
    m = block.select(s)
    assert torch.equal(m, (s[..., 1] > s[..., 0]).float())
    torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)


def test_unselected_tokens_only_get_the_swiglu():
    block = tiny_block("sal").eval()
    with torch.no_grad():
        block.gate.bias.copy_(torch.tensor([50.0, -50.0]))  # select nothing
    x = torch.randn(2, 13, D_MODEL)
    expected = x + block.mlp(block.mlp_norm(x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("refine", ["interpolate", "residual"])
def test_selected_token_takes_the_attention_output(refine):
    block = tiny_block("sal", refine=refine).eval()
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.bias.copy_(torch.tensor([0.0, 2.0]))  # select everything, a = sigmoid(2)
    x = torch.randn(1, 9, D_MODEL)
    u = block.norm(x)
    o = block.attn(u, q_mask=torch.ones(1, 9, dtype=torch.bool))
    a = torch.sigmoid(torch.tensor(2.0))
    h = (1 - a) * x + a * o if refine == "interpolate" else x + a * o  # Eq. 5, or its residual form
    torch.testing.assert_close(block(x), h + block.mlp(block.mlp_norm(h)), atol=1e-5, rtol=1e-5)


def test_calibrated_inference_selects_about_capacity():
    """Training forwards track the (1-C)-quantile of s1 - s0; eval then selects about C."""
    C = 0.2
    block = open_sal_gate(tiny_block("sal", capacity=C, inference="calibrated"))
    x = torch.randn(4, 64, D_MODEL)
    with torch.no_grad():
        block.eval()
        assert block.select(block.gate(block.norm(x)).float()).mean() > 0.4  # the init threshold
        block.train()
        for _ in range(600):  # EMA with momentum 0.99 converges
            block(x, Aux())
        block.eval()
        aux = Aux()
        block(x, aux)
    assert abs(aux.metrics["block/selected_frac"].item() - C) < 0.03
    assert "select_threshold" in block.state_dict()
    assert "select_threshold" not in tiny_block("sal", inference="threshold").state_dict()  # no new state


def test_topk_inference_is_forward_only():
    C, L = 0.25, 18
    block = open_sal_gate(tiny_block("sal", capacity=C, inference="topk")).eval()
    x = torch.randn(3, L, D_MODEL)
    aux = Aux()
    with torch.no_grad():
        block(x, aux)
        assert aux.metrics["block/selected_frac"].item() == pytest.approx(5 / L)  # ceil(0.25 * 18)
        cache = block.allocate_cache(3, L)
        with pytest.raises(RuntimeError, match="non-causal"):
            block.step(x[:, 0], cache)
        with pytest.raises(RuntimeError, match="non-causal"):
            block.prefill(x, cache)


class _Fixed(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, u):
        return self.s


def _signal_run(block, x, seed=5):
    """Forward + backward of one training step with the gate's logits as a leaf: -> (output,
    d out / d logits, d out / d x, d out / d the attention's weights, the selection)."""
    s = block.gate(block.norm(x)).float().detach().requires_grad_()
    block.gate = _Fixed(s)  # read the gradient on the logits
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = block(x, Aux())
    gs, gx, gw = torch.autograd.grad(y.pow(2).sum(), (s, x, block.attn.wqkv.weight))
    torch.manual_seed(seed)
    m = block.select(s.detach())
    return y.detach(), gs, gx, gw, m


def _signal_blocks(*signals, **kw):
    torch.manual_seed(0)
    first = open_sal_gate(tiny_block("sal", signal=signals[0], **kw), scale=0.3).train()  # unsaturated
    blocks = [first]
    for sig in signals[1:]:
        b = tiny_block("sal", signal=sig, **kw).train()
        b.load_state_dict(first.state_dict())
        blocks.append(b)
    return blocks


@pytest.mark.parametrize("refine", ["interpolate", "residual"])
def test_signals_all_and_dense_reach_unselected_gates_with_the_same_forward(refine):
    x = torch.randn(2, 16, D_MODEL)
    runs = [_signal_run(b, x) for b in _signal_blocks("selected", "all", "dense", refine=refine)]
    (y0, gs0, _, gw0, m), (y1, gs1, gx1, gw1, _), (y2, gs2, gx2, gw2, _) = runs
    assert 0 < m.mean() < 1
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(y0, y2)  # the forward does not change with the signal
    unsel = m == 0
    assert (gs0[unsel].abs().sum(-1) < 1e-6).all()  # the paper's reading: the budget loss alone
    assert (gs1[unsel].abs().sum(-1) > 0).all()  # all: what selecting them would change
    torch.testing.assert_close(gs1, gs2)  # dense gives the gates the same signal as all ...
    torch.testing.assert_close(gx1, gx2)  # ... and the residual stream the same gradient,
    assert (gw2 - gw1).abs().max() > 1e-4  # while the attention also learns at unselected tokens
    torch.testing.assert_close(gw0, gw1)  # (all: the attention learns only where selected)


def test_dense_attention_signal_is_the_gradient_it_would_get_if_selected():
    """At an unselected token, dense trains the attention with sg(a) * d loss / d y: the
    gradient a block whose gate had picked that token would give it (residual form)."""
    torch.manual_seed(0)
    block = tiny_block("sal", signal="dense").train()
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.bias.copy_(torch.tensor([1.0, -1.0]))  # a = sigmoid(-2)
        block.mlp.w_down.weight.zero_()  # y = the refined h: d loss / d y is what the SAL sees
    block.select = lambda s: torch.zeros(s.shape[:-1])  # and picks nothing
    x = torch.randn(1, 12, D_MODEL)
    y = block(x, Aux())
    assert torch.equal(y, x)  # forward: no attention
    g = 2 * y.detach()  # d (y^2).sum() / d y, held fixed: the linear signal
    (gw,) = torch.autograd.grad((y * g).sum(), block.attn.wqkv.weight)
    a = torch.sigmoid(torch.tensor(-2.0))
    h = x.detach()
    o = block.attn(block.norm(h), q_mask=torch.ones(1, 12, dtype=torch.bool))
    (expected,) = torch.autograd.grad((a * o * g).sum(), block.attn.wqkv.weight)
    torch.testing.assert_close(gw, expected, rtol=1e-4, atol=1e-7)
    assert expected.abs().max() > 1e-3


def test_explore_selects_a_random_share_more_in_training_only():
    x = torch.randn(4, 64, D_MODEL)
    explore, plain = _signal_blocks("explore", "selected")
    y0, gs0, _, _, m = _signal_run(plain, x)
    y1, gs1, _, _, _ = _signal_run(explore, x)
    assert not torch.allclose(y0, y1)  # explored tokens take their attention output
    unsel = m == 0
    reached = gs1[unsel].abs().sum(-1) > 0  # the explored ones: straight-through gradient
    assert 0.03 < reached.float().mean() < 0.2  # about the explore share (0.1) of them
    torch.manual_seed(0)
    every = tiny_block("sal", signal="explore", explore=1.0).train()
    aux = Aux()
    with torch.no_grad():
        out = every(x, aux)
        ones = torch.ones(4, 64, dtype=torch.bool)
        u = every.norm(x)
        a = torch.softmax(every.gate(u).float(), -1)[..., 1]
        h = x + a[..., None] * every.attn(u, q_mask=ones)
    torch.testing.assert_close(out, h + every.mlp(every.mlp_norm(h)), atol=1e-5, rtol=1e-5)
    assert aux.metrics["block/selected_frac"] < 0.4  # the budget counts the gate's own picks
    every.eval()
    with torch.no_grad():
        assert every.select(every.gate(every.norm(x)).float()).mean() < 0.5  # eval: no exploring


def test_runs_saved_with_gate_grad_load_as_trained():
    from hybridlab.blocks.sal import SALConfig

    old = SALConfig.from_dict({**TINY_SAL, "gate_grad": "all", "inference": "threshold"}, D_MODEL)
    assert (old.signal, old.refine, old.inference) == ("all", "interpolate", "threshold")
    new = SALConfig.from_dict(TINY_SAL, D_MODEL)
    assert (new.signal, new.refine, new.inference) == ("explore", "residual", "calibrated")


def test_capacity_curriculum_schedule():
    """capacity_start falls linearly to capacity over capacity_warmup_steps, then stays."""
    from hybridlab.blocks.sal import SALConfig

    cfg = SALConfig.from_dict({**TINY_SAL, "capacity": 0.15, "capacity_start": 0.55,
                               "capacity_warmup_steps": 100}, D_MODEL)
    assert cfg.capacity_at(0) == pytest.approx(0.55)
    assert cfg.capacity_at(50) == pytest.approx(0.35)
    assert cfg.capacity_at(75) == pytest.approx(0.25)
    assert cfg.capacity_at(100) == pytest.approx(0.15)
    assert cfg.capacity_at(10_000) == pytest.approx(0.15)
    assert cfg.capacity_at(None) == pytest.approx(0.15)  # outside training: the final C
    plain = SALConfig.from_dict(TINY_SAL, D_MODEL)
    assert plain.capacity_at(0) == plain.capacity_at(None) == plain.capacity
    held = SALConfig.from_dict({**TINY_SAL, "capacity": 0.15, "capacity_start": 0.55,
                                "capacity_warmup_steps": 100, "capacity_hold_steps": 40}, D_MODEL)
    assert held.capacity_at(0) == held.capacity_at(40) == pytest.approx(0.55)
    assert held.capacity_at(90) == pytest.approx(0.35)  # halfway down, 40 steps later
    assert held.capacity_at(140) == held.capacity_at(None) == pytest.approx(0.15)


@pytest.mark.parametrize("only", [{"capacity_start": 0.5}, {"capacity_warmup_steps": 10},
                                  {"capacity_hold_steps": 10}])
def test_capacity_curriculum_needs_both_fields(only):
    from hybridlab.config import ConfigError

    with pytest.raises(ConfigError):
        tiny_block("sal", **only)


def test_capacity_curriculum_budget_loss_uses_scheduled_target_in_training_only():
    C, start, warm = 0.15, 0.75, 40
    block = tiny_block("sal", capacity=C, capacity_start=start, capacity_warmup_steps=warm)
    m = torch.zeros(2, 20)
    m[0, :10] = 1  # 0.5 selected
    m[1, :4] = 1   # 0.2
    block.select = lambda s: m

    def budget(step, training=True):
        block.train(training)
        aux = Aux(scope="s", step=step)
        with torch.no_grad():
            block(torch.randn(2, 20, D_MODEL), aux)
        return aux.metrics["s/budget_loss"].item()

    def eq7(target):
        return ((target - 0.5) ** 2 + (target - 0.2) ** 2) / 2

    assert budget(0) == pytest.approx(eq7(start))
    assert budget(10) == pytest.approx(eq7(0.6))   # a quarter of the way from 0.75 to 0.15
    assert budget(warm) == pytest.approx(eq7(C))
    assert budget(None) == pytest.approx(eq7(C))
    assert budget(0, training=False) == pytest.approx(eq7(C))  # eval: always the final C


def test_capacity_curriculum_gate_starts_at_capacity_start_and_trainer_passes_step():
    from hybridlab.graph import parse_arch
    from hybridlab.model import HybridLM

    block = tiny_block("sal", capacity=0.1, capacity_start=0.6, capacity_warmup_steps=50).train()
    aux = Aux()
    with torch.no_grad():
        block(torch.randn(8, 256, D_MODEL), aux)
    assert abs(aux.metrics["block/selected_frac"].item() - 0.6) < 0.05
    # the model hands `step` to the blocks through Aux: a late step sees the final target
    arch = parse_arch({"name": "t", "d_model": D_MODEL, "vocab_size": 16, "pattern": "S",
                       "defaults": {"sal": {**TINY_SAL, "capacity": 0.1, "capacity_start": 0.6,
                                            "capacity_warmup_steps": 50}}})
    model = HybridLM(arch).train()
    idx = torch.randint(0, 16, (4, 32))
    torch.manual_seed(0)
    early = model(idx, idx, step=0).metrics
    torch.manual_seed(0)
    late = model(idx, idx, step=50).metrics
    frac = early["layers.0.sal/selected_frac"]
    assert early["layers.0.sal/budget_loss"] != late["layers.0.sal/budget_loss"]
    assert late["layers.0.sal/selected_frac"] == frac  # same selection, only the target moved
