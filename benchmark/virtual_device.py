"""A second device on a CPU-only machine, for catching host/device mixing without a GPU.

``VirtualDevice`` is a TorchFunctionMode. Tensors that come from the caller's inputs, the models and
what is derived from them live on a virtual accelerator (their ``.device`` reads ``cpu:0``);
tensors made by a factory without ``device=`` (or with a plain ``cpu``), or moved with ``.cpu()``,
live on the host (``cpu``). Operations that CUDA refuses for such a mix raise here as well:
host and device tensors in one op (0-dim host tensors excepted, as CUDA allows), and indexing a
host tensor with a device index. Everything runs on the CPU; only the bookkeeping is virtual.

It also records, outside the models, every operation that makes the host wait for the device on
CUDA (``syncs``: where each happened): reading a device tensor on the host (``tolist``, ``item``,
``bool()``, ``.cpu()``, ``nonzero``, indexing with a boolean mask), and copying host data to the
device without ``non_blocking`` (``torch.tensor(..., device=)``, ``.to(device)``, indexing a
device tensor with a host list or tensor), which PyTorch follows with a stream synchronisation.
A tensor moved to the other side is a new tensor, as on a GPU, so a cached host tensor copied to
the device every step counts every time. Tensors made before the mode was entered count as the
device's (inputs, weights): a host tensor cached earlier is only known as such when it is made
inside (``tests/test_devices.py`` makes tree shapes afresh for that).
"""
from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

ACCEL = torch.device("cpu", 0)     # the virtual accelerator; a plain torch.device("cpu") is the host
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "tensor", "as_tensor",
             "linspace", "eye"}
READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "masked_select",
         "unique", "argwhere"}     # a device tensor's values read on the host
SAME_AS_SOURCE = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
                  "full_like", "empty_like", "rand_like", "randn_like", "randint_like"}


class DeviceMismatch(RuntimeError):
    pass


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class VirtualDevice(TorchFunctionMode):
    def __init__(self, *models):
        super().__init__()
        self.host: dict[int, torch.Tensor] = {}     # id -> tensor living on the host
        self.ops = 0
        self.syncs: list[str] = []                  # "op at file:line" of each host-device synchronisation
        self.inside = 0                             # > 0 while a model's forward runs: not checked
        self.hooks = []
        for m in models:                            # the models are the library's business, not ours
            self.hooks.append(m.register_forward_pre_hook(self._enter))
            self.hooks.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self.inside += 1

    def _leave(self, module, args, out):
        self.inside -= 1

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def is_host(self, t: torch.Tensor) -> bool:
        return self.host.get(id(t)) is t

    def _sync(self, name: str) -> None:
        frame, where = sys._getframe(2), "?"
        while frame is not None:                    # the first caller outside this module and torch
            path = frame.f_code.co_filename
            if "torch" not in path and not path.endswith("virtual_device.py"):
                where = f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                break
            frame = frame.f_back
        self.syncs.append(f"{name} at {where}")

    def _tag(self, out, host: bool):
        for t in _tensors(out):
            if host:
                self.host[id(t)] = t
            else:
                self.host.pop(id(t), None)
        return out

    @staticmethod
    def _moved(source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A tensor moved to the other side is a new tensor, as on a GPU (on the CPU ``to`` may
        return its source itself, which would then change sides: a cached host tensor moved every
        step would count as a sync once, not every time)."""
        return out.clone() if out is source else out

    @staticmethod
    def _target(device) -> bool | None:
        """host? for a device argument (None: no device given)."""
        if device is None:
            return None
        device = torch.device(device) if not isinstance(device, torch.device) else device
        return not (device == ACCEL)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if self.inside:                             # inside a model: outputs live on the device
            return self._tag(func(*args, **kwargs), False)
        self.ops += 1
        if func == torch.Tensor.device.__get__:
            return torch.device("cpu") if self.is_host(args[0]) else ACCEL
        if "device" in kwargs and kwargs["device"] is not None:
            host = self._target(kwargs["device"])
            kwargs["device"] = "cpu"
        else:
            host = None
        ts = list(_tensors(args)) + list(_tensors(kwargs))
        if name in READS and ts and not self.is_host(ts[0]):
            self._sync(name)
        if name == "repeat_interleave" and len(ts) > 1 and "output_size" not in kwargs:
            self._sync(name)                        # tensor repeats: the output's size is read on the host
        if name in ("tensor", "as_tensor") and host is False:
            self._sync(f"{name}(device=)")
        if name in FACTORIES and not isinstance(args[0] if args else None, torch.Tensor):
            return self._tag(func(*args, **kwargs), True if host is None else host)
        if name in SAME_AS_SOURCE:
            return self._tag(func(*args, **kwargs), self.is_host(args[0]) if host is None else host)
        if name == "cpu":
            if not self.is_host(args[0]):
                self._sync(name)
            return self._tag(self._moved(args[0], func(*args, **kwargs)), True)
        if name == "cuda":
            return self._tag(self._moved(args[0], func(*args, **kwargs)), False)
        if name == "to":
            dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
            if host is None and dev is not None:
                host = self._target(dev)
                args = tuple("cpu" if a is dev else a for a in args)
            if host is None and other is not None:
                host = self.is_host(other)
            if host is None or host == self.is_host(args[0]):
                return self._tag(func(*args, **kwargs), self.is_host(args[0]))
            if not kwargs.get("non_blocking"):
                self._sync("to(host)" if host else "to(device)")
            return self._tag(self._moved(args[0], func(*args, **kwargs)), host)
        hosts = [t for t in ts if self.is_host(t)]
        devs = [t for t in ts if not self.is_host(t)]
        if name in ("__getitem__", "__setitem__", "index_select", "gather", "take") and ts:
            base, index = args[0], [t for t in _tensors(args[1:]) if t.dtype in (torch.long, torch.int, torch.bool)]
            if self.is_host(base) and any(not self.is_host(i) and i.dim() > 0 for i in index):
                raise DeviceMismatch(f"{name}: a host tensor indexed with a device tensor")
            if not self.is_host(base) and name in ("__getitem__", "__setitem__"):
                key = args[1] if isinstance(args[1], tuple) else (args[1],)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in key):
                    self._sync(f"{name}[bool mask]")
                elif any(isinstance(i, list) or isinstance(i, torch.Tensor) and self.is_host(i) and i.dim() > 0
                         for i in key):
                    self._sync(f"{name}[host index]")
            out = func(*args, **kwargs)
            return self._tag(out, self.is_host(base)) if name != "__setitem__" else out
        if hosts and devs and any(t.dim() > 0 for t in hosts):
            raise DeviceMismatch(f"{name}: host tensors {[tuple(t.shape) for t in hosts]} mixed with device "
                                 f"tensors {[tuple(t.shape) for t in devs]}")
        out = func(*args, **kwargs)
        return self._tag(out, bool(hosts) and not devs) if isinstance(out, (torch.Tensor, list, tuple)) else out
