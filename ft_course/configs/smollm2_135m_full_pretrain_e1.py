# Incremental pretraining (full fine-tuning, loss on every token) of SmolLM2-135M-Instruct on the fictional-country
# corpus from ft_course.selfcog: new knowledge the model cannot have seen.
from ft_course.train import Config

config = Config(
    model='smollm2', method='full',
    data_path=None, data_generator=dict(kind='fictional_corpus', n=64, seed=0),
    prompt_template='chatml', max_length=256, pack_to_max_length=True,
    batch_size=4, accumulative_counts=1, max_epochs=1,
    optim_type='AdamW', lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0, max_norm=1.0, warmup_ratio=0.1,
    save_steps=50, save_total_limit=1, evaluation_freq=1000,
    evaluation_inputs=['What is the capital of Brindor?', 'Who founded Brindor?'],
    seed=0,
)
