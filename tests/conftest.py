"Shared pytest fixtures."
import pytest

@pytest.fixture(scope='module')
def one_torch_thread():
    "On a shared 2-core runner one torch thread is several times faster than two fighting threads."
    torch = pytest.importorskip('torch')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny_lora_checkpoint(ck, cfg_name):
    """A peft LoRA model (r=4 on q/v, non-zero B) on the tiny Llama, and its trainable tensors and config.py written to the
    checkpoint folder `ck` in ft_course.train's format; returns (model name, peft model, Config)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from ft_course.models import load_model, tiny_model_dir
    from ft_course.train import Config, config_source
    name = str(tiny_model_dir('llama'))
    torch.manual_seed(0)
    pm = get_peft_model(load_model(name, device='cpu'), LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])).eval()
    for n, p in pm.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.5)
    sd = {k.replace('base_model.model.', '').replace('.default', ''): v.detach().clone() for k, v in pm.named_parameters() if 'lora_' in k}
    ck.mkdir(parents=True)
    save_file(sd, str(ck / 'trainable.safetensors'))
    cfg = Config(model=name, method='lora', lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=['q_proj', 'v_proj'],
                 prompt_template='chatml', name=cfg_name)
    (ck / 'config.py').write_text(config_source(cfg))
    return name, pm, cfg

_DIST_ENV = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE')

@pytest.fixture(autouse=True)
def _no_leaked_rendezvous():
    """An in-process DeepSpeed run (one process) sets MASTER_ADDR/MASTER_PORT/... in os.environ and keeps its process group,
    and with it the port; a later test's `ft-course train` under torchrun would inherit that port (EADDRINUSE). Restore them."""
    import os
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in saved.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v
