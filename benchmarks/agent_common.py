"""What the agent benchmarks (agent_laptop.py on a CPU, agent_gpu.py on a GPU) share."""
import torch

def dequantize_bases(model, dtype=None):
    """Swap every NF4 base layer for a plain Linear holding its dequantized weight (in `dtype`, default the layer's
    compute dtype): the same function, without dequantizing again for every generated token."""
    from ft_course.nf4 import LinearNF4
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, LinearNF4):
                w = child.dequantize(dtype or child.compute_dtype or torch.float32)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=w.device)
                lin.weight.data = w; lin.requires_grad_(False)
                if child.bias is not None: lin.bias.data = child.bias.data.to(w.dtype)
                setattr(mod, name, lin)
    return model
