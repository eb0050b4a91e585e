# Llama 3 8B on an InternEvo tokenized folder made with the Llama 3 tokenizer
# (for raw jsonl: evotune tokenize ... --tokenizer meta-llama/Meta-Llama-3-8B --template llama3).
# Token ids must be below the model's vocabulary (128,256): evotune checks before training.
from evotune import (AdamW, CosineAnnealingLR, LinearLR, SequenceParallelSampler, SupervisedFinetune,
                     build_packed_dataset, load_intern_repo_tokenized_dataset, load_model, load_tokenizer)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'meta-llama/Meta-Llama-3-8B'  # a local copy of the Hugging Face model (huggingface-cli download ...)
use_varlen_attn = True  # attention stays inside each document of a pack (InternEvo's cu_seqlens)

# Data
dataset_folder = '/path/to/your/dataset'  # the InternEvo tokenized folder (.bin + .bin.meta)
max_length = 8192  # tokens per pack: Llama 3's context length
max_length_per_sample = None  # InternEvo's seq_len: longer segments are split (None: max_length)
pack_sample_into_one = False

# Scheduler & Optimizer
batch_size = 1  # packs per micro-batch per device
accumulative_counts = 4  # micro-batches per optimizer step (InternEvo's micro_num)
max_epochs = 1
lr = 2e-05  # full fine-tuning
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1  # grad clip
warm_up_ratio = 0.03

# Parallel
sequence_parallel_size = 1  # packs of 8k fit one GPU with activation checkpointing
activation_checkpointing = 'auto'  # 'auto' (by free GPU memory; 'full' on CPU) | 'full' | 'selective' | 'none'
torch_compile = 'auto'  # 'auto': compile each decoder layer on a GPU with bf16 compute | True | False

# Save
save_steps = 500
save_total_limit = 2  # keep the last K checkpoints (-1: all)

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    activation_checkpointing=activation_checkpointing,
    torch_compile=torch_compile,
    llm=dict(type=load_model, path=pretrained_model_name_or_path, dtype='bfloat16'))

#######################################################################
#                    PART 3  Dataset & Dataloader                     #
#######################################################################
train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_tokenized_dataset,
        data_order_path=None,
        folder=dataset_folder,
        min_length=0,
        file_type='.bin'),
    packed_length=max_length,
    max_length_per_sample=max_length_per_sample,
    pack_sample_into_one=pack_sample_into_one,
    seed=1024)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,  # worker processes that read and collate packs (0: one background thread)
    sampler=dict(type=SequenceParallelSampler, shuffle=True))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm),
    accumulative_counts=accumulative_counts,
    dtype='bfloat16')

# warm-up from lr/40, then cosine to 0.15 * lr; begin/end in epochs
param_scheduler = [
    dict(type=LinearLR, start_factor=1 / 40, begin=0, end=warm_up_ratio * max_epochs),
    dict(type=CosineAnnealingLR, eta_min=lr * 0.15, begin=warm_up_ratio * max_epochs, end=max_epochs),
]

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
train_cfg = dict(max_epochs=max_epochs)
checkpoint = dict(interval=save_steps, max_keep_ckpts=save_total_limit)
log_interval = 10  # loss and grad norm reach the host every 10 steps (metrics.jsonl still has every step)
randomness = dict(seed=None)
