# The lesson's run: QLoRA on InternLM2-chat-1.8B with XTuner's defaults (needs the model hub and, in practice, a GPU).
from ft_course.train import Config

config = Config(
    model='internlm/internlm2-chat-1_8b',
    method='qlora', quant_backend='bnb', double_quant=True,
    lora_r=64, lora_alpha=16, lora_dropout=0.1, lora_target_modules='all-linear',
    data_path=None,
    data_generator=dict(kind='self_cognition', name='Ada', author='the ft_course team', n=8000, lang='both', replay=2000, seed=0),
    prompt_template='internlm2_chat', system=None,
    max_length=2048, pack_to_max_length=True,
    batch_size=1, accumulative_counts=16, dataloader_num_workers=0, max_epochs=3,
    optim_type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, max_norm=1.0, warmup_ratio=0.03,
    save_steps=500, save_total_limit=2, evaluation_freq=500,
    evaluation_inputs=['请你介绍一下你自己', '你是谁', '你是我的小助手吗', 'Please introduce yourself'],
    seed=0, gradient_checkpointing=True, deepspeed=None,
)
