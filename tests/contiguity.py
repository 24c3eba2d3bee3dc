"""Every hidden state handed to a recurrent kernel must be contiguous: cuDNN refuses a strided one
(``rnn: hx is not contiguous``) where the CPU kernels accept it, so the CPU tests wrap the kernels
and record what they are given."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.nn.modules import rnn as rnn_module

KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _states(name: str, args: tuple) -> list[torch.Tensor]:
    if name == "lstm_layer":
        return [args[1], args[2]]
    if len(args) > 1 and isinstance(args[1], (tuple, list)):  # lstm(input, (h, c), params, ...)
        return list(args[1])
    # gru/rnn(input, hx, params, ...), or the packed form (data, batch_sizes, hx, ...)
    return [a for a in args[1:3] if isinstance(a, torch.Tensor) and a.dim() == 3][:1]


def _checked(kernel: Callable, name: str, seen: list[str]) -> Callable:
    @functools.wraps(kernel)
    def run(*args: Any, **kwargs: Any) -> Any:
        for state in _states(name, args):
            seen.append(name if state.is_contiguous() else f"{name}: strided state {tuple(state.stride())}")
        return kernel(*args, **kwargs)
    return run


def install(monkeypatch: Any, seen: list[str]) -> None:
    """Wrap ``torch._VF``'s recurrences (and nn.RNN's table of them) and charlm's own LSTM layer."""
    import charlm.model.cells as cells_module
    import charlm.model.lm as model_module
    import charlm.model.lstm_kernel as lstm_kernel

    for name in KERNELS:
        monkeypatch.setattr(torch._VF, name, _checked(getattr(torch._VF, name), name, seen))
    for mode, kernel in list(rnn_module._rnn_impls.items()):
        monkeypatch.setitem(rnn_module._rnn_impls, mode, _checked(kernel, mode.lower(), seen))
    for module in (model_module, cells_module):  # the model's layer-by-layer path, and PeepholeLSTM's forward
        monkeypatch.setattr(module, "lstm_layer", _checked(lstm_kernel.lstm_layer, "lstm_layer", seen))


class _Patcher:
    """monkeypatch's two calls, for a process without pytest (the distributed worker)."""

    def setattr(self, target: Any, name: str, value: Any) -> None:
        setattr(target, name, value)

    def setitem(self, mapping: dict, key: Any, value: Any) -> None:
        mapping[key] = value


def install_failing() -> None:
    """In a plain process: any strided state handed to a kernel raises at once."""
    class Failing(list):
        def append(self, item: str) -> None:
            if "strided" in item:
                raise AssertionError(item)
            super().append(item)
    install(_Patcher(), Failing())
