"""The published recipes: the flags each stage's presets set over its defaults (the offline toy task),
every stage's side by side, each with the source of its numbers.

    python sft.py pythia-tldr && python train_rm.py pythia-tldr && python ppo.py pythia-tldr

A preset is a plain dict of flags; `common.parse_args` turns it into the stage's Args, and any flag given after
the preset's name overrides it. "Huang et al. 2024" is "The N+ Implementation Details of RLHF with PPO".
"""


# sft.py
SFT = {
    "pythia-tldr": (
        "Pythia-1B on TL;DR, Huang et al. 2024 (GPU)",
        # The SFT settings of Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"),
        # summarize_from_feedback_details/sft.py and benchmark.sbatch: AdamW lr 3e-6, eps 1e-5,
        # cosine decay with no warmup, one epoch, batch 128 (8 GPUs x 16 accumulation x 1), loss on the
        # query tokens too, responses of at most 53 tokens after a query of 512 tokens.
        dict(
            model_name_or_path="EleutherAI/pythia-1b-deduped",
            # a no-op under transformers 5, where Pythia's tokenizer pads with '<|padding|>'; a copy saved
            # without a pad token gets a distinct '[PAD]'
            add_pad_token=True,
            dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
            prompt_column="query",
            # " {summary}<|endoftext|>": it already ends in EOS, so none is appended twice
            completion_column="reference_response",
            max_prompt_length=512,
            max_completion_length=53,
            # the queries were fitted to 512 tokens (the post cut at a newline; tldr_dataset.py) before being
            # decoded to text; re-tokenising can move a few by a token, so trim those rather than fail
            truncate_long_prompts=True,
            train_on_prompt=True,
            learning_rate=3e-6,
            adam_eps=1e-5,
            weight_decay=0.01,  # torch's AdamW default, which Huang et al. keep
            warmup_steps=0,
            num_train_epochs=1,
            batch_size=128,
            gradient_accumulation_steps=16,
            group_by_length=False,  # plain shuffled batches, as theirs
            eval_every=200,
            eval_batch_size=32,
            max_new_tokens=53,
            eval_fn=None,
        ),
    ),
    "hh-rlhf": (
        "Pythia-1B on Anthropic HH-RLHF's chosen dialogues (GPU)",
        # Whole dialogues: the prompt is everything up to the last "\n\nAssistant:", the completion is the
        # final reply. The settings past the data are ours, scaled from the TL;DR preset.
        dict(
            model_name_or_path="EleutherAI/pythia-1b-deduped",
            add_pad_token=True,  # a no-op for Pythia's tokenizer under transformers 5 (see pythia-tldr)
            dataset="Anthropic/hh-rlhf",
            dataset_format="implicit_prompt",
            completion_column="chosen",
            eval_split="test",
            max_prompt_length=512,
            max_completion_length=256,
            truncate_long_prompts=True,  # keep the end of a long dialogue, the turn being answered
            learning_rate=1e-5,
            weight_decay=0.01,
            warmup_steps=0,
            num_train_epochs=1,
            batch_size=64,
            gradient_accumulation_steps=8,
            group_by_length=False,
            eval_every=200,
            eval_batch_size=16,
            max_new_tokens=128,
            eval_fn=None,
        ),
    ),
    "ultrafeedback": (
        "Qwen2.5-0.5B-Instruct on UltraFeedback binarized, chat template (GPU)",
        # train_sft/test_sft hold "messages" conversations; they are rendered with the model's ChatML
        # template, and each completion ends with the template's end-of-turn token <|im_end|>.
        dict(
            model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
            add_pad_token=True,  # only if its pad token is missing or equals EOS
            dataset="HuggingFaceH4/ultrafeedback_binarized",
            dataset_format="conversational",
            messages_column="messages",
            train_split="train_sft",
            eval_split="test_sft",
            max_prompt_length=1024,
            max_completion_length=1024,
            truncate_long_prompts=True,
            learning_rate=1e-5,
            weight_decay=0.01,
            warmup_steps=0,
            num_train_epochs=1,
            batch_size=64,
            gradient_accumulation_steps=8,
            group_by_length=False,
            eval_every=200,
            eval_batch_size=8,
            max_new_tokens=256,
            eval_fn=None,
        ),
    ),
}


# train_rm.py
REWARD_MODEL = {
    "pythia-tldr": (
        "Pythia-1B RM on TL;DR preferences, Huang et al. 2024 (GPU)",
        # Huang et al. 2024, summarize_from_feedback_details/reward.py: AdamW lr 3e-6 eps 1e-5, cosine, 1 epoch,
        # batch 64 (8 GPUs x grad-accum 8), 92,832 pairs, queries <= 512 tokens, query+response <= 638 tokens.
        # Text columns: "query" is the formatted post ending in "TL;DR:", "chosen"/"rejected" start with a
        # space and end in "<|endoftext|>" (so no separator, and no second EOS). They normalised on the SFT
        # dataset's reference summaries; we use SFT-policy samples (temperature 0.7, 53 tokens, as their PPO).
        dict(
            model_name_or_path="models/sft",
            dataset="vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144",
            prompt_column="query",
            separator="",
            max_length=640,
            learning_rate=3e-6,
            weight_decay=0.01,  # torch's AdamW default, which Huang et al. keep
            num_train_epochs=1,
            lr_schedule="cosine",
            batch_size=64,
            micro_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,  # plain shuffled batches, as theirs
            group_by_prompt=False,
            prompt_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
            prompt_dataset_column="query",
            num_normalisation_prompts=2048,
            response_length=53,
            max_prompt_length=512,  # as ppo.py pythia-tldr
            truncate_long_prompts=True,
            generation_batch_size=64,
        ),
    ),
    "hh-rlhf": (
        "Pythia-1B RM on Anthropic HH-RLHF (GPU)",
        # chosen/rejected are whole dialogues; the prompt is their shared prefix up to the last
        # "\n\nAssistant:" (--dataset_format implicit_prompt). Settings past the data are the TL;DR preset's.
        dict(
            model_name_or_path="models/sft",
            dataset="Anthropic/hh-rlhf",
            dataset_format="implicit_prompt",
            eval_split="test",
            max_length=768,
            learning_rate=3e-6,
            weight_decay=0.01,
            num_train_epochs=1,
            batch_size=64,
            micro_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,
            num_normalisation_prompts=2048,
            response_length=128,
            max_prompt_length=512,  # as ppo.py hh-rlhf
            truncate_long_prompts=True,
            generation_batch_size=32,
        ),
    ),
    "ultrafeedback": (
        "Qwen2.5-0.5B RM on UltraFeedback binarized, chat template (GPU)",
        # chosen/rejected are [user, assistant] conversations that share the user turn; each is rendered
        # with the chat template and the reward is read at the assistant's end-of-turn token.
        dict(
            model_name_or_path="models/sft",
            dataset="HuggingFaceH4/ultrafeedback_binarized",
            dataset_format="conversational",
            train_split="train_prefs",
            eval_split="test_prefs",
            max_length=2048,
            learning_rate=3e-6,
            weight_decay=0.01,
            num_train_epochs=1,
            batch_size=64,
            micro_batch_size=4,
            eval_batch_size=8,
            eval_every=500,
            group_by_length=False,
            num_normalisation_prompts=1024,
            response_length=256,
            max_prompt_length=1024,  # as ppo.py ultrafeedback
            truncate_long_prompts=True,
            generation_batch_size=16,
        ),
    ),
}


# ppo.py
PPO = {
    "pythia-tldr": (
        "Pythia-1B on TL;DR, Huang et al. 2024 (GPU)",
        # Huang et al. 2024, summarize_from_feedback_details/ppo.py (once ppo_left_padding.py) and its sbatch for
        # Pythia-1B: lr 3e-6, eps 1e-5, beta 0.05, 4 epochs, 1 minibatch of 512 episodes (8 GPUs x 4
        # accumulation x 16), responses of 53 tokens at temperature 0.7, missing-EOS penalty -1,
        # 1M episodes, queries of 512 tokens. Evaluation at temperature 0.01 (OpenAI's summarize-from-feedback).
        dict(
            sft_model="models/sft",
            reward_model=["models/rm"],
            dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
            prompt_column="query",
            max_prompt_length=512,
            truncate_long_prompts=True,
            gold_reward_fn=None,
            total_episodes=1_000_000,
            batch_size=512,
            response_length=53,
            temperature=0.7,
            missing_eos_penalty=-1.0,
            local_rollout_forward_batch_size=64,
            # Huang et al. 2024 sample the rollout in chunks of their forward batch too: the KV cache holds 64
            generation_batch_size=64,
            kl_coef=0.05,
            num_ppo_epochs=4,
            num_minibatches=1,
            micro_batch_size=16,
            learning_rate=3e-6,
            weight_decay=0.01,  # torch's AdamW default, which Huang et al. keep
            max_grad_norm=1.0,
            eval_every=100,
            eval_samples=256,
            eval_batch_size=32,
            eval_temperature=0.01,
            sample_every=100,
        ),
    ),
    "hh-rlhf": (
        "Pythia-1B PPO on Anthropic HH-RLHF prompts (GPU)",
        # prompts: each chosen dialogue up to its last "\n\nAssistant:"; the rest follows the TL;DR preset
        dict(
            sft_model="models/sft",
            reward_model=["models/rm"],
            dataset="Anthropic/hh-rlhf",
            prompt_column="chosen",
            implicit_prompt_marker="\n\nAssistant:",
            eval_split="test",
            max_prompt_length=512,
            truncate_long_prompts=True,
            gold_reward_fn=None,
            total_episodes=200_000,
            batch_size=512,
            response_length=128,
            micro_batch_size=8,
            local_rollout_forward_batch_size=32,
            generation_batch_size=32,
            learning_rate=3e-6,
            weight_decay=0.01,
            max_grad_norm=1.0,
            eval_every=50,
            eval_samples=256,
            eval_batch_size=32,
            sample_every=50,
        ),
    ),
    "ultrafeedback": (
        "Qwen2.5-0.5B PPO on UltraFeedback prompts, chat template (GPU)",
        # train_gen/test_gen prompts (text) become one user message of the chat template; a response ends
        # at <|im_end|>, the template's end-of-turn token
        dict(
            sft_model="models/sft",
            reward_model=["models/rm"],
            dataset="HuggingFaceH4/ultrafeedback_binarized",
            prompt_column="prompt",
            prompt_format="chat",
            train_split="train_gen",
            eval_split="test_gen",
            max_prompt_length=1024,
            truncate_long_prompts=True,
            gold_reward_fn=None,
            total_episodes=200_000,
            batch_size=256,
            response_length=256,
            micro_batch_size=4,
            local_rollout_forward_batch_size=16,
            generation_batch_size=16,
            learning_rate=1e-6,
            weight_decay=0.01,
            max_grad_norm=1.0,
            eval_every=50,
            eval_samples=256,
            eval_batch_size=16,
            sample_every=50,
        ),
    ),
}


# Pythia-6.9B at the TL;DR settings, as Huang et al. 2024 ran it (benchmark.sbatch, sbatches/ppo_left_padding6b.sbatch):
# the same batch of 512 episodes, lengths and hyperparameters, split for its size: micro-batches of 1 sequence (8 GPUs
# x 64 accumulation x 1), rollout forwards and generation chunks of 4, evaluation 4 prompts at a time
PPO["pythia-tldr-6.9b"] = ("Pythia-6.9B on TL;DR, Huang et al. 2024 (8 GPUs)",
                           {**PPO["pythia-tldr"][1], "micro_batch_size": 1, "local_rollout_forward_batch_size": 4,
                            "generation_batch_size": 4, "eval_batch_size": 4})
SFT["pythia-tldr-6.9b"] = ("Pythia-6.9B on TL;DR, Huang et al. 2024 (8 GPUs)",
                           {**SFT["pythia-tldr"][1], "model_name_or_path": "EleutherAI/pythia-6.9b-deduped",
                            "eval_batch_size": 4})
REWARD_MODEL["pythia-tldr-6.9b"] = ("Pythia-6.9B RM on TL;DR preferences, Huang et al. 2024 (8 GPUs)",
                                    {**REWARD_MODEL["pythia-tldr"][1], "micro_batch_size": 1, "eval_batch_size": 4,
                                     "generation_batch_size": 4})

# grpo.py: PPO's presets, data and sizes alike, without the critic; each prompt sampled 4 times (a batch of 512
# episodes is 128 prompts), the KL as GRPO's k3 loss term (grpo.py's defaults)
GRPO = {name: (about.replace(" PPO ", " GRPO ").replace("Huang et al. 2024", "Huang et al. 2024's settings, GRPO"),
               {**flags, "samples_per_prompt": 4})
        for name, (about, flags) in PPO.items()}


# dpo.py: the preference data of train_rm.py's presets, the held-out prompts and sampling of ppo.py's, the optimiser of
# each recipe's published DPO run. The policy's log-probabilities use the raw logits (temperature 1), as those runs did
DPO = {
    "pythia-tldr": (
        "Pythia-1B DPO on TL;DR preferences, Huang et al. 2024 (GPU)",
        # Huang et al. 2024, summarize_from_feedback_details/dpo.py and sbatches/dpo.sbatch: beta 0.05, AdamW lr 3e-6
        # eps 1e-5 (torch's weight decay 0.01), cosine with no warm-up, 1 epoch of the 92,832 pairs, batch 64 (8 GPUs x
        # 8 accumulation x 1), log-probabilities of the raw logits, the reference on the fly. Evaluation as ppo.py's
        # pythia-tldr preset: 256 validation queries, 53 tokens at temperature 0.01.
        dict(
            model_name_or_path="models/sft",
            dataset="vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144",
            prompt_column="query",
            separator="",
            max_length=640,
            beta=0.05,
            temperature=1.0,
            learning_rate=3e-6,
            weight_decay=0.01,
            lr_schedule="cosine",
            num_train_epochs=1,
            batch_size=64,
            micro_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,  # plain shuffled batches, as theirs
            group_by_prompt=False,
            prompt_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
            prompt_dataset_column="query",
            max_prompt_length=512,
            truncate_long_prompts=True,
            response_length=53,
            eval_temperature=0.01,
            eval_samples=256,
            generation_batch_size=32,
            gold_reward_fn=None,
        ),
    ),
    "hh-rlhf": (
        "Pythia-1B DPO on Anthropic HH-RLHF, Rafailov et al. 2023's settings (GPU)",
        # Rafailov et al. 2023, Appendix B: beta 0.1, batch 64, learning rate 1e-6 warmed up linearly over 150 steps
        # (they use RMSprop; AdamW here, as the other stages), for their dialogue task on Anthropic HH. The prompt is
        # the shared prefix up to the last "\n\nAssistant:"; evaluation on the test dialogues' prompts, as ppo.py's.
        dict(
            model_name_or_path="models/sft",
            dataset="Anthropic/hh-rlhf",
            dataset_format="implicit_prompt",
            eval_split="test",
            max_length=768,
            beta=0.1,
            temperature=1.0,
            learning_rate=1e-6,
            warmup_steps=150,
            lr_schedule="constant",
            num_train_epochs=1,
            batch_size=64,
            micro_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,
            num_eval_pairs=2048,
            prompt_dataset="Anthropic/hh-rlhf",
            prompt_dataset_column="chosen",
            prompt_dataset_split="test",
            max_prompt_length=512,
            truncate_long_prompts=True,
            response_length=128,
            eval_samples=256,
            generation_batch_size=32,
            gold_reward_fn=None,
        ),
    ),
    "ultrafeedback": (
        "Qwen2.5-0.5B DPO on UltraFeedback binarized, Zephyr's recipe, chat template (GPU)",
        # alignment-handbook recipes/zephyr-7b-beta/dpo/config_full.yaml: beta 0.01, lr 5e-7, cosine with 10% warm-up
        # (48 of the 477 steps), 1 epoch, 8 pairs per device x 2 accumulation on 8 GPUs = 128 pairs, max_length 1024.
        # Zephyr truncates longer pairs; here they are dropped (train_rm.py's rule). Evaluation as ppo.py's preset.
        dict(
            model_name_or_path="models/sft",
            dataset="HuggingFaceH4/ultrafeedback_binarized",
            dataset_format="conversational",
            train_split="train_prefs",
            eval_split="test_prefs",
            max_length=1024,
            beta=0.01,
            temperature=1.0,
            learning_rate=5e-7,
            warmup_steps=48,
            lr_schedule="cosine",
            num_train_epochs=1,
            batch_size=128,
            micro_batch_size=4,
            eval_batch_size=8,
            eval_every=100,
            group_by_length=False,
            prompt_dataset="HuggingFaceH4/ultrafeedback_binarized",
            prompt_dataset_split="test_gen",
            max_prompt_length=1024,
            truncate_long_prompts=True,
            response_length=256,
            eval_samples=256,
            generation_batch_size=16,
            gold_reward_fn=None,
        ),
    ),
}
