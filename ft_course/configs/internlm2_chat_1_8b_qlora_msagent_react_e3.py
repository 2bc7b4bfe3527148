# The lesson's agent run: QLoRA on InternLM2-chat-1.8B over the MS-Agent data in ReAct style (XTuner's
# internlm_7b_qlora_msagent_react_e3_gpu8 with the 1.8B chat model). Needs the model hub and the dataset hub
# (damo/MSAgent-Bench; or a local copy: set data_path to its JSONL) and, in practice, a GPU.
# Each record is read by ft_course.agent.read_msagent; plugin results are context, never trained.
from ft_course.train import Config

config = Config(
    model='internlm/internlm2-chat-1_8b',
    method='qlora', quant_backend='bnb', double_quant=True,
    lora_r=64, lora_alpha=16, lora_dropout=0.1, lora_target_modules='all-linear',
    data_path=None, dataset_builder='ft_course.agent:build_dataset',
    data_generator=dict(kind='msagent', source='damo/MSAgent-Bench', fmt='react', n=None),
    prompt_template='internlm2_chat', system=None,
    max_length=2048, pack_to_max_length=True,
    batch_size=1, accumulative_counts=16, dataloader_num_workers=0, max_epochs=3,
    optim_type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, max_norm=1.0, warmup_ratio=0.03,
    save_steps=500, save_total_limit=2, evaluation_freq=500,
    evaluation_inputs=['北京今天天气怎么样？', 'What is 12 times 7?'],
    seed=0, gradient_checkpointing=True, deepspeed=None,
)
