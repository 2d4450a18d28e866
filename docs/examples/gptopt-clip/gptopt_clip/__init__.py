"""The clip99 observer: each group's grid spans its 1st to 99th percentile (`quantize --observer clip99`)."""
from gptopt_core import Observer, hookimpl


def percentile_range(groups, bits, symmetric, importance):
    """(lo, hi) per group: the 1st and 99th percentiles of its weights."""
    import torch

    return torch.quantile(groups, 0.01, dim=2), torch.quantile(groups, 0.99, dim=2)


@hookimpl
def gptopt_register_observers(register):
    register(Observer("clip99", percentile_range, help="each group's 1st to 99th percentile"))
