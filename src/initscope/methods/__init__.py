"""Initialization methods: what each does with a layer's geometry and the propagated statistics."""

from __future__ import annotations

from dataclasses import dataclass

from initscope.methods import asv, classic


@dataclass(frozen=True)
class Method:
    """An initialization method.

    Attributes:
        name: the name ``plan`` and ``init_`` take.
        summary: one line for listings.
        direction: the signal it keeps, ``"forward"`` or ``"backward"``.
        exact: the std is chosen from the full propagation rather than from a formula.
        distribution: the default distribution; None where the method draws its own way.
        residual: the default residual policy.
    """

    name: str
    summary: str
    direction: str
    exact: bool = False
    distribution: str | None = "normal"
    residual: str = "none"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("xavier", "Glorot & Bengio 2010: var = 2/(fan_in + fan_out)", "forward"),
        Method("kaiming-forward", "He et al. 2015, fan_in: var = 2/fan_in", "forward"),
        Method("kaiming-backward", "He et al. 2015, fan_out: var = 2/fan_out", "backward"),
        Method("asv-forward", "ASV forward (Henmi et al.): var = M'/(tau eps)", "forward", residual="scale"),
        Method("asv-backward", "ASV backward (Henmi et al.): var = M/(gamma eps)", "backward", residual="scale"),
        Method("asv-forward-exact", "predicted output second moment 1 at every layer", "forward", exact=True,
               residual="scale"),
        Method("asv-backward-exact", "predicted input-gradient second moment 1 at every layer", "backward",
               exact=True, residual="scale"),
        Method("lecun", "LeCun et al. 1998: var = 1/fan_in", "forward"),
        Method("orthogonal", "Saxe et al. 2014, gain sqrt(2): orthonormal rows or columns", "forward",
               distribution=None),
        Method("default", "the modules' own reset_parameters (kaiming_uniform, a=sqrt(5))", "forward",
               distribution="uniform"),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r} is not one of {tuple(METHODS)}") from None


def layer_std(method: Method, layer, max_std_ratio: float | None, fan: str) -> tuple[float, bool]:
    """The std a fixed-formula method gives ``layer``, and whether the ASV clamp bit.

    For the exact variants this is the paper's value, which they start from.
    """
    g = layer.geometry
    fan_in, fan_out = classic.fans(g, layer.weight, fan)
    name = method.name
    if name == "xavier":
        return classic.xavier_std(fan_in, fan_out), False
    if name == "kaiming-forward":
        return classic.kaiming_std(fan_in), False
    if name == "kaiming-backward":
        return classic.kaiming_std(fan_out), False
    if name == "lecun":
        return classic.lecun_std(fan_in), False
    if name == "orthogonal":
        return classic.orthogonal_std(g.weight_shape), False
    if name == "default":
        return classic.default_std(layer.weight), False
    if method.direction == "forward":
        return asv.clamp(asv.asv_forward_std(g, layer.tau_in), g, "forward", max_std_ratio)
    return asv.clamp(asv.asv_backward_std(g, layer.gamma), g, "backward", max_std_ratio)
