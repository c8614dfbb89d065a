"""Optimizer parameter groups: weight decay where it belongs, and per-parameter overrides from designs.

Rules, in order (the first that applies wins):

1. **Overrides.** Any module may carry an ``optim_overrides`` dict attribute mapping a parameter
   name, relative to that module (``"beta"``, ``"sub.weight"``), to ``{"lr_mult": float,
   "weight_decay": float}`` (either key may be left out: lr_mult defaults to 1, weight_decay to
   rules 2-3). Infini-attention uses it for its gates (10x learning rate, no decay).
2. **No decay** for biases, for every parameter of a norm layer (a class named ``*Norm``, e.g.
   ``RMSNorm``, ``LayerNorm``, ``GroupNorm``, ``BatchNorm1d``) or of an ``nn.Embedding``, and for
   any parameter with fewer than 2 dimensions (gains, scales, gates: decay would pull them to 0,
   which is not "small weights" for them).
3. Everything else gets ``weight_decay``.

A parameter shared by two modules (a tied head) appears once. Parameters with
``requires_grad=False`` are left out.
"""

from __future__ import annotations

from torch import nn

__all__ = ["param_groups", "no_decay"]

_OVERRIDE_KEYS = {"lr_mult", "weight_decay"}


def no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether rule 2 exempts ``param`` (called ``name`` inside its owner ``module``) from decay."""
    return (
        name == "bias"
        or isinstance(module, nn.Embedding)
        or type(module).__name__.endswith("Norm")
        or isinstance(module, nn.modules.batchnorm._NormBase)
        or param.dim() < 2
    )


def _overrides(model: nn.Module) -> dict[int, dict]:
    """``id(parameter) -> override dict`` from every module's ``optim_overrides``."""
    found: dict[int, dict] = {}
    for prefix, module in model.named_modules():
        table = getattr(module, "optim_overrides", None)
        if not table:
            continue
        where = prefix or "model"
        if not isinstance(table, dict):
            raise TypeError(f"{where}.optim_overrides must be a dict name -> {{'lr_mult', 'weight_decay'}}, got {type(table).__name__}")
        for name, spec in table.items():
            bad = set(spec) - _OVERRIDE_KEYS
            if bad:
                raise ValueError(f"{where}.optim_overrides[{name!r}] has unknown key(s) {sorted(bad)}; allowed: {sorted(_OVERRIDE_KEYS)}")
            try:
                param = module.get_parameter(name)
            except AttributeError as err:
                own = [n for n, _ in module.named_parameters()]
                raise ValueError(f"{where}.optim_overrides names {name!r}, which is not one of its parameters {own}") from err
            found[id(param)] = dict(spec)
    return found


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups for a ``torch.optim`` optimizer (e.g. AdamW), following the module docstring's rules.

    Args:
        model: any ``nn.Module``.
        lr: base learning rate; a group's ``lr`` is ``lr * lr_mult``.
        weight_decay: decay of the parameters no rule exempts.

    Returns:
        One dict per distinct (lr_mult, weight_decay), in order of first appearance, each with
        ``params`` (list of tensors), ``names`` (their qualified names), ``lr``, ``lr_mult`` (for
        schedules that set ``lr = base * lr_mult`` every step) and ``weight_decay``.

    Raises:
        ValueError / TypeError: a malformed ``optim_overrides`` (unknown parameter name or key).

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, lr=4e-3, weight_decay=0.1), betas=(0.9, 0.95))
    """
    overrides = _overrides(model)
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            spec = overrides.get(id(param), {})
            default_wd = 0.0 if no_decay(module, name, param) else weight_decay
            key = (float(spec.get("lr_mult", 1.0)), float(spec.get("weight_decay", default_wd)))
            group = groups.setdefault(key, {"params": [], "names": [], "lr": lr * key[0], "lr_mult": key[0], "weight_decay": key[1]})
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}" if module_name else name)
    return list(groups.values())
