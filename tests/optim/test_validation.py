"""Hyperparameters are validated at construction, with exact messages."""

import pytest
import torch

from stablestep.optim import Adam, AdamAtan2, AdamW


def _p():
    return [torch.zeros(2, requires_grad=True)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(betas=(0.9,)), "betas must be a pair (beta1, beta2), got (0.9,)"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(eps_mode="keras"), "Invalid eps_mode: 'keras' (expected 'torch' or 'tf')"),
        (dict(impl="cuda"),
         "Invalid impl: 'cuda' (expected one of "
         "'auto', 'fused', 'foreach', 'reference', 'compiled')"),
        (dict(lr=torch.tensor(0.1)), "lr as a Tensor is not supported: pass a float"),
    ],
)
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_messages(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(_p(), **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(a=0.0), "Invalid a value: 0.0"),
        (dict(b=-1.0), "Invalid b value: -1.0"),
        (dict(impl="fused"),
         "impl='fused' is not available for AdamAtan2; use 'auto' or 'foreach'"),
    ],
)
def test_atan2_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        AdamAtan2(_p(), **kwargs)
    assert str(info.value) == message


def test_flags_are_keyword_only():
    with pytest.raises(TypeError):
        Adam(_p(), 1e-3, (0.9, 0.999), 1e-8, 0.0, False, False)  # decoupled_weight_decay


def test_sparse_gradients_rejected():
    p = torch.zeros(3, requires_grad=True)
    opt = Adam([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", [Adam, AdamW, AdamAtan2])
@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable", "differentiable"])
def test_torch_implementation_flags_point_to_impl(cls, flag):
    with pytest.raises(TypeError) as info:
        cls(_p(), **{flag: True})
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__} ") and f"{flag}=" in msg and "impl=" in msg
    if flag == "foreach" or (flag == "fused" and cls is not AdamAtan2):
        assert f"impl='{flag}'" in msg
    assert "'fused'" not in msg or cls is not AdamAtan2  # no path AdamAtan2 lacks


def test_unknown_keyword_is_pythons_message():
    with pytest.raises(TypeError, match=r"^Adam.__init__\(\) got an unexpected keyword "
                                        r"argument 'momentum'$"):
        Adam(_p(), momentum=0.9)


@pytest.mark.parametrize("cls", [Adam, AdamW, AdamAtan2])
@pytest.mark.parametrize("betas", [(torch.tensor(0.9), 0.999), torch.tensor([0.9, 0.999])])
def test_tensor_betas_get_their_own_message(cls, betas):
    with pytest.raises(ValueError) as info:
        cls(_p(), betas=betas)
    assert str(info.value) == ("betas as Tensors are not supported: pass two floats, "
                               "e.g. betas=(0.9, 0.999)")
