"""The JAX backend's device mesh: how many local devices hold one copy of the model (the
``model`` axis: attention heads and MLP columns split over them) and how many copies run
side by side on slices of the batch (the ``data`` axis).

``extract.mesh=1d``: every local device on the model axis (data axis 1). ``2d``:
``extract.mesh_model_axis`` devices per copy, ``devices / mesh_model_axis`` copies. KV
heads are split too when their count divides the model axis, else every device holds
all of them (Qwen2/Llama have fewer KV heads than query heads). Pure arithmetic: no JAX
import, so a launch can check what it knows before any machine runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.core.errors import ConfigError
from lib.extract.params import MESHES

DATA, MODEL = "data", "model"


@dataclass(frozen=True)
class MeshLayout:
    data: int
    model: int
    shard_kv: bool  # KV projections split over the model axis (else replicated)


def _fits(d: int, heads: int, intermediate: int) -> bool:
    return heads % d == 0 and intermediate % d == 0


def check_model_axis(axis: int, *, heads: int, intermediate: int, where: str, key: str) -> None:
    """Raise ``ConfigError`` naming both numbers when the model's attention heads or MLP
    width cannot be split evenly over ``axis`` devices."""
    if heads % axis:
        raise ConfigError(
            f"{key} splits the {heads} attention heads of {where} over a model axis of "
            f"{axis} devices, but {heads} is not divisible by {axis}; use a model axis that "
            f"divides {heads} (extract.mesh=2d extract.mesh_model_axis=M)"
        )
    if intermediate % axis:
        raise ConfigError(
            f"{key} splits the MLP of {where} (intermediate_size {intermediate}) over a model "
            f"axis of {axis} devices, but {intermediate} is not divisible by {axis}; use a "
            "model axis that divides it (extract.mesh=2d extract.mesh_model_axis=M)"
        )


def check_mesh_config(
    kind: str,
    model_axis: int | None,
    *,
    heads: int,
    intermediate: int,
    where: str,
    devices: int | None = None,
) -> None:
    """What can be checked of ``extract.mesh``/``mesh_model_axis`` knowing the model (and
    the local device count, where known: a launch does not know the workers'). Raises
    ``ConfigError`` naming the key and the numbers."""
    if kind not in MESHES:
        raise ConfigError(f"extract.mesh={kind}: choose one of {', '.join(MESHES)}")
    on = f" ({devices})" if devices is not None else ""
    if kind == "1d":
        if model_axis is not None:
            raise ConfigError(
                f"extract.mesh_model_axis={model_axis} is for extract.mesh=2d; with "
                f"extract.mesh=1d the model axis is every local device{on}. Set "
                "extract.mesh=2d, or extract.mesh_model_axis=null"
            )
        if devices is not None:
            check_model_axis(
                devices, heads=heads, intermediate=intermediate, where=where, key="extract.mesh=1d"
            )
        return
    if model_axis is None:
        fit = ""
        if devices is not None:
            ok = [
                d
                for d in range(1, devices + 1)
                if devices % d == 0 and _fits(d, heads, intermediate)
            ]
            fit = f" This machine has {devices} device(s); for {where} M can be one of {ok}."
        raise ConfigError(
            "extract.mesh=2d needs extract.mesh_model_axis=M (devices per model copy; the "
            f"data axis is then devices / M).{fit}"
        )
    if devices is not None and devices % model_axis:
        raise ConfigError(
            f"extract.mesh_model_axis={model_axis} does not divide the {devices} local "
            f"device(s); use a divisor of {devices}"
        )
    check_model_axis(
        model_axis,
        heads=heads,
        intermediate=intermediate,
        where=where,
        key=f"extract.mesh_model_axis={model_axis}",
    )


def mesh_layout(
    kind: str,
    model_axis: int | None,
    devices: int,
    *,
    heads: int,
    kv_heads: int,
    intermediate: int,
    batch_size: int,
    where: str,
) -> MeshLayout:
    """The (data, model) axes for ``devices`` local devices. Raises ``ConfigError`` naming
    the key and the numbers that do not divide (heads, MLP width, devices, batch size)."""
    check_mesh_config(
        kind, model_axis, heads=heads, intermediate=intermediate, where=where, devices=devices
    )
    model = devices if kind == "1d" else int(model_axis or devices)
    data = devices // model
    if batch_size % data:
        raise ConfigError(
            f"extract.batch_size={batch_size} is not divisible by the data axis of the mesh "
            f"({data} = {devices} devices / model axis {model}); use a batch size that is a "
            f"multiple of {data}"
        )
    return MeshLayout(data=data, model=model, shard_kv=kv_heads % model == 0)
