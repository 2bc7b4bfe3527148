# QLoRA self-cognition on SmolLM2-135M-Instruct: the course's offline default (XTuner's internlm2_chat_1_8b_qlora_*_e3,
# shrunk to run on a laptop CPU). Copy it with `ft-course copy-cfg smollm2_135m_qlora_selfcog_e3 .` and edit the copy.
from ft_course.train import Config

config = Config(
    # model: zoo name, folder or hub name; 4-bit NF4 base (bitsandbytes) + LoRA on every linear layer but lm_head
    model='smollm2',
    method='qlora', quant_backend='bnb', double_quant=True,
    lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules='all-linear',
    # data: written into WORK_DIR/data/ by the generator when data_path is None; 'replay' mixes in the base
    # model's own answers to general prompts so that the new identity does not swallow everything else
    data_path=None,
    data_generator=dict(kind='self_cognition', name='Ada', author='the ft_course team', n=240, lang='en', replay=120, seed=0),
    prompt_template='chatml', system=None,
    max_length=256, pack_to_max_length=True,
    # schedule: micro-batches of 4 packed sequences, one optimizer step each
    batch_size=4, accumulative_counts=1, dataloader_num_workers=0, max_epochs=3,
    optim_type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.0, max_norm=1.0, warmup_ratio=0.03,
    # checkpoints and evaluation
    save_steps=20, save_total_limit=2, evaluation_freq=1000,
    evaluation_inputs=['Please introduce yourself.', 'Who are you?', 'Are you my assistant?', 'What is the capital of France?'],
    seed=0, gradient_checkpointing=False, deepspeed=None,
)
