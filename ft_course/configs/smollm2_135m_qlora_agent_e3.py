# Tool use (JSON tool calls) on SmolLM2-135M-Instruct with QLoRA: the agent lesson's laptop run (nbs/12_agent.ipynb),
# XTuner's internlm_7b_qlora_msagent_react_e3_gpu8 shrunk to a CPU. The data is generated (ft_course.agent): tool
# questions with ground truth and questions that need no tool; observations are never trained.
# Copy it with `ft-course copy-cfg smollm2_135m_qlora_agent_e3 .` and edit the copy.
from ft_course.train import Config

config = Config(
    # model: 4-bit NF4 base (the course's own NF4 layers: they train on CPU) + LoRA on every linear layer but lm_head
    model='smollm2',
    method='qlora', quant_backend='ft_course', double_quant=True,
    lora_r=32, lora_alpha=64, lora_dropout=0.0, lora_target_modules='all-linear',
    # data: built by ft_course.agent's dataset builder from the generator spec (fmt 'json' or 'react'); 40% of the samples
    # need no tool: chosen on the dev split over 25% (benchmarks/agent_gpu.py, benchmarks/results/agent_gpu.json)
    data_path=None, dataset_builder='ft_course.agent:build_dataset',
    data_generator=dict(kind='agent', fmt='json', n=400, no_tool=0.4, seed=0),
    prompt_template='chatml', system=None,
    max_length=320, pack_to_max_length=True,
    # schedule: micro-batches of 4 packed sequences, one optimizer step each
    batch_size=4, accumulative_counts=1, dataloader_num_workers=0, max_epochs=2,
    optim_type='AdamW', lr=6e-4, betas=(0.9, 0.999), weight_decay=0.0, max_norm=1.0, warmup_ratio=0.05,
    # checkpoints and evaluation (the tool evaluation runs after training, in the notebook)
    save_steps=25, save_total_limit=2, evaluation_freq=10**6,
    evaluation_inputs=['What is the capital of France?'], eval_max_new_tokens=32,
    seed=0, gradient_checkpointing=False, deepspeed=None,
)
