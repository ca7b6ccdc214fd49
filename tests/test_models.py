"""Our WideResNet is RobustBench's DMWideResNet: same state-dict keys and shapes, same logits."""

import pytest
import torch

import zoo
from zoo.models import WideResNet, build_model


@pytest.fixture(scope="module")
def dm_module():
    from zoo.robustbench_compat import import_robustbench
    import_robustbench()
    from robustbench.model_zoo.architectures import dm_wide_resnet
    return dm_wide_resnet


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights AND batch-norm statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                vals = torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var") \
                    else torch.randn(t.shape, generator=g) * 0.1
                t.copy_(vals)


@pytest.mark.parametrize("depth,width,num_classes,dataset", [(10, 1, 10, "cifar10"), (16, 2, 100, "cifar100"),
                                                             (28, 10, 10, "cifar10")])
def test_matches_robustbench_dmwideresnet(dm_module, depth, width, num_classes, dataset):
    mean = dm_module.CIFAR10_MEAN if dataset == "cifar10" else dm_module.CIFAR100_MEAN
    std = dm_module.CIFAR10_STD if dataset == "cifar10" else dm_module.CIFAR100_STD
    theirs = dm_module.DMWideResNet(num_classes=num_classes, depth=depth, width=width,
                                    activation_fn=dm_module.Swish, mean=mean, std=std).eval()
    ours = WideResNet(num_classes=num_classes, depth=depth, width=width, activation="silu", mean=mean, std=std).eval()

    ref_state = theirs.state_dict()
    our_state = ours.state_dict()
    assert list(our_state) == list(ref_state)
    assert all(our_state[k].shape == ref_state[k].shape for k in ref_state)

    _randomise(theirs, seed=depth)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-5


def test_registry_variants_build_with_their_normalisation():
    model = zoo.info("score-wrn-28-10")
    net = build_model(model, model.variant("cifar100", "linf"))
    assert net.logits.out_features == 100 and not net.training
    assert torch.allclose(net.mean.flatten(), torch.tensor([0.5071, 0.4865, 0.4409]))
    assert "mean" not in net.state_dict() and "std" not in net.state_dict()  # non-persistent buffers
    # WRN-28-10 has 36,479,194 parameters with 10 classes; 90 more classes add 90 * (640 + 1)
    assert sum(p.numel() for p in net.parameters()) == 36_479_194 + 90 * 641


def test_input_gradients_flow_and_channels_last_agrees():
    net = WideResNet(depth=10, width=1).eval()
    _randomise(net, seed=3)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        a = net(x)
        b = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert (a - b).abs().max() < 1e-5


def test_rejects_impossible_depth():
    with pytest.raises(ValueError, match="6k\\+4"):
        WideResNet(depth=12)


@pytest.mark.parametrize("name", ["score-wrn-28-10", "score-wrn-70-16"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_every_registry_entry_has_robustbench_keys_and_shapes(dm_module, name, dataset):
    """The full-size networks, built on the meta device (no memory): same state dict layout as RobustBench's."""
    model = zoo.info(name)
    variant = model.variant(dataset, "linf")
    with torch.device("meta"):
        ours = build_model(model, variant)
        theirs = dm_module.DMWideResNet(num_classes=variant.num_classes, depth=model.architecture.depth,
                                        width=model.architecture.width, activation_fn=dm_module.Swish,
                                        mean=variant.mean, std=variant.std)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert list(ours_shapes) == list(theirs.state_dict())
    assert ours_shapes["logits.weight"] == (variant.num_classes, 64 * model.architecture.width)
