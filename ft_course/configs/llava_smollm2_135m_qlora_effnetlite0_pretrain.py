# LLaVA stage 1 (pretrain, "feature alignment"): EfficientNet-Lite0 (frozen) -> projector (trained) -> SmolLM2-135M (frozen).
# Data: synthetic shapes images with captions (+ one caption per real sample photo); exact ground truth, made on the fly.
# XTuner's name for this kind of config: llava_{llm}_qlora_{vit}_lora_e1_gpu8_pretrain.
# Run:  ft-course train llava_smollm2_135m_qlora_effnetlite0_pretrain --work-dir work_dirs/llava_pretrain
from ft_course.core import has_cuda
from ft_course.train import Config

config = Config(
    model='smollm2',
    method='qlora' if has_cuda() else 'lora',   # the frozen LLM in 4-bit NF4 on a GPU; full precision on CPU (4-bit is slow there)
    model_builder='ft_course.llava:build_model',
    dataset_builder='ft_course.llava_data:build_dataset',
    # the LLaVA settings live in data_generator (the trainer's Config has no LLaVA fields); see ft_course.llava.LLAVA_DEFAULTS
    data_generator=dict(kind='llava', stage='pretrain', vision_tower='effnet-lite0-ms', image_size=224,
                        n_images=2000, seed=0, photos=['coffee', 'rocket', 'chelsea', 'astronaut', 'grace_hopper']),
    prompt_template='chatml',
    max_length=256,
    batch_size=16,
    accumulative_counts=1,
    max_epochs=1,
    lr=1e-3,                  # LLaVA-1.5 stage 1
    weight_decay=0.0,
    max_norm=1.0,
    warmup_ratio=0.03,
    save_steps=100,
    save_total_limit=2,
    evaluation_inputs=[],     # text-only prompts mean nothing here: the notebooks evaluate on held-out images
)
