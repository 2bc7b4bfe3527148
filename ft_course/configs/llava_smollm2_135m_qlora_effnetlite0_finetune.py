# LLaVA stage 2 (finetune, "visual instruction tuning"): projector + LoRA on SmolLM2-135M, vision encoder frozen.
# Data: synthetic shapes images with multi-turn Q/A (colour, shape, count, left/right), the real-photo conversations
# repeated (the lesson's recipe: 6 conversations x 200) and a few text-only samples (batches mix both kinds).
# Start from the stage-1 projector: set data_generator['pretrained_pth'] to the pretrain run's checkpoint, e.g.
#   ft-course train llava_smollm2_135m_qlora_effnetlite0_finetune --work-dir work_dirs/llava_finetune \
#       --cfg-options "data_generator={'kind': 'llava', 'stage': 'finetune', 'pretrained_pth': 'work_dirs/llava_pretrain/checkpoints/iter_125'}"
# then: ft-course convert pth_to_hf llava_smollm2_135m_qlora_effnetlite0_finetune work_dirs/llava_finetune/checkpoints/iter_N llava_hf
#       ft-course chat smollm2 --llava llava_hf --image photo.jpg
from ft_course.core import has_cuda
from ft_course.train import Config

config = Config(
    model='smollm2',
    method='qlora' if has_cuda() else 'lora',   # NF4 base + LoRA on a GPU (QLoRA); full-precision base + LoRA on CPU
    lora_r=64, lora_alpha=128, lora_dropout=0.05,  # LLaVA-1.5's LoRA recipe is r=128, alpha=256; r=64 is plenty for a 135M LLM
    lora_target_modules='all-linear',
    model_builder='ft_course.llava:build_model',
    dataset_builder='ft_course.llava_data:build_dataset',
    data_generator=dict(kind='llava', stage='finetune', vision_tower='effnet-lite0-ms', image_size=224,
                        n_images=2000, seed=1, photos=['coffee'], repeats=200, max_turns=4,
                        pretrained_pth='work_dirs/llava_pretrain/checkpoints/iter_125'),
    prompt_template='chatml',
    max_length=256,
    batch_size=16,
    accumulative_counts=1,
    max_epochs=1,
    lr=2e-4,                  # LLaVA-1.5 LoRA stage 2
    weight_decay=0.0,
    max_norm=1.0,
    warmup_ratio=0.03,
    save_steps=100,
    save_total_limit=2,
    evaluation_inputs=[],
)
