"""Count the places where code waits for a tensor's value on the host. On CUDA each one stalls the stream until
the GPU catches up; on the CPU they cost nothing, so this counter is how tests and bench/throughput.py find them
on a machine without a GPU.

Counted: every aten op that returns a value or a shape that depends on the data (`.item()`, `bool()`, `int()`
and `float()` of a tensor, `nonzero`, boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave`
without an output size), and `.tolist()`, `.numpy()` and `np.asarray` of a tensor."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                      aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                      aten.repeat_interleave.Tensor, aten.bincount.default}
TENSOR_READS = ("tolist", "numpy", "__array__")


class HostReadCounter(TorchDispatchMode):
    """with HostReadCounter() as reads: ...; then reads.total and reads.by_op (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.by_op = Counter()
        self.originals = {}
        self.inside_read = False  # np.asarray calls __array__, which calls numpy: one read

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT_OPS and not (func is aten.repeat_interleave.Tensor and
                                               kwargs.get("output_size") is not None):
            self.by_op[func.name()] += 1
        elif func is aten.index.Tensor and any(index is not None and index.dtype == torch.bool
                                               for index in args[1]):
            self.by_op["boolean mask indexing"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in TENSOR_READS:  # these read the data directly in C++, without an aten op to intercept
            original = self.originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self.counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc_info):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc_info)

    def counting(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self.inside_read:
                return original(tensor, *args, **kwargs)
            self.by_op[f"Tensor.{name}"] += 1
            self.inside_read = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.inside_read = False

        return read
