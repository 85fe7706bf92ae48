"""The embedded default: SFT warm-start then GRPO on generated arithmetic word problems, on CPU.

  python -m grpo_jax.train --config configs/default.py --workdir /tmp/grpo_default
  python -m grpo_jax.train --config configs/default.py:tiny --workdir /tmp/grpo_tiny   # ~1 minute smoke run
  python -m grpo_jax.train --config configs/default.py:sft_matched --workdir /tmp/sft_matched   # the SFT control
  python -m grpo_jax.train --config configs/default.py:paper --workdir /tmp/paper   # DeepSeekMath's GRPO choices
  python -m grpo_jax.train --config configs/default.py --workdir /tmp/g16 --config.rl.group_size=16
"""
import ml_collections

from grpo_jax.parallel.sharding import LOGICAL_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed drives init, data order and sampling

  c.task = ml_collections.ConfigDict()
  c.task.name = 'arithmetic'  # generated GSM8K-style +/- word problems (grpo_jax/data/tasks.py)
  c.task.num_train = 20000  # train split size (prompts for SFT and GRPO)
  c.task.num_val = 200  # validation split: SFT early stopping only
  c.task.num_test = 500  # held-out split: the reported accuracies
  c.task.min_steps = 2  # arithmetic steps per problem
  c.task.max_steps = 3
  c.task.start_range = (10, 99)  # starting quantity
  c.task.change_range = (2, 9)  # size of each +/- change
  # The SFT data's teacher forgets a borrow (52-7=55) this often (data/tasks.py): an error imitation cannot get past
  # (greedy decoding keeps the teacher's majority digit) and an outcome reward can; 0 = an exact teacher.
  c.task.teacher_slip = 0.75
  c.task.prompt_template = 'qa'  # 'Q: {question}\nA: ' (grpo_jax/data/prompts.py), or any string with {question}
  c.task.chat = 'never'  # 'auto' | 'always' | 'never': wrap the prompt in the tokenizer's chat template
  c.task.verifier = 'gsm8k_exact'  # what counts as correct in the reported accuracy (rewards registry)
  c.task.skip_long_prompts = False  # True: drop (and count) prompts longer than max_prompt_len; False: an error
  # Datasets (task.name 'gsm8k' | 'math' | 'math500' | 'cmath', grpo_jax/data/datasets.py):
  c.task.train_split = 'train'
  c.task.test_split = 'test'
  c.task.source_dir = ''  # '' = the JSONL shipped in data/; or a directory with the same files
  # task.name 'jsonl': any dataset as JSONL files, one object per line
  c.task.train_file = ''
  c.task.test_file = ''
  c.task.question_field = 'question'
  c.task.answer_field = 'answer'
  c.task.solution_field = ''  # '' = no worked solutions (no SFT on them)
  c.task.answer_from_solution = ''  # '' | 'gsm8k' (text after ####) | 'boxed' (last \boxed{}) when no answer field

  c.model = ml_collections.ConfigDict()  # vocab_size comes from the tokenizer
  c.model.path = ''  # a local Hugging Face model directory (config.json, *.safetensors, tokenizer); '' = from scratch
  c.model.d_model = 96
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2  # < num_heads: grouped-query attention
  c.model.head_dim = 24
  c.model.mlp_dim = 256  # SwiGLU hidden size
  c.model.rope_theta = 10000.0
  c.model.rms_eps = 1e-6
  c.model.qkv_bias = False  # True for Qwen2
  c.model.qk_norm = False  # True for Qwen3
  c.model.tie_embeddings = False
  c.model.param_dtype = 'float32'
  c.model.dtype = 'float32'  # compute dtype ('bfloat16' on accelerators)
  c.model.init_std = 0.02
  c.model.remat = 'none'  # training forward: 'none' | 'full' (blocks recompute in backward) | 'save_dots' (keep dots)
  c.model.logprob_chunk = 0  # > 0: LM head + logprobs over this many completion positions at a time; 0 = all at once

  c.max_prompt_len = 56  # tokens; longer prompts are an error, shorter are left-padded
  c.max_new_tokens = 40  # completion budget (SFT targets must fit too)
  c.decode_block = 0  # > 0: the KV cache grows this many slots at a time (less attention; more compile, memory)
  c.decode_buckets = 1  # k > 1: blocks decode only the rows not ended, at the least of k sizes b, b/2, ...; same tokens

  c.sft = ml_collections.ConfigDict()
  c.sft.batch_size = 32
  c.sft.max_steps = 1500  # SFT steps (fewer if target_accuracy is reached first)
  c.sft.target_accuracy = 1.0  # stop once greedy validation accuracy reaches this; 1.0 = run all max_steps
  c.sft.eval_every = 100  # steps between validation evals (logged; they decide the early stop)
  c.sft.lr = 3e-3
  c.sft.warmup_steps = 50
  c.sft.schedule = 'cosine'  # 'cosine' (decays over max_steps) or 'constant'
  c.sft.weight_decay = 0.0
  c.sft.grad_clip = 1.0
  c.sft.grad_accum_steps = 1  # k micro-batches per batch, one update (live activations: one micro-batch's)
  c.sft.master_dtype = 'float32'  # params stored narrower (model.param_dtype) train via a master copy; '' = none

  c.rl = ml_collections.ConfigDict()
  c.rl.algorithm = 'grpo'  # 'grpo' | 'ppo' (the baseline with a learned critic and GAE; config.ppo, pipeline/ppo.py)
  c.rl.num_steps = 200  # GRPO steps in all (one rollout batch each), over all outer iterations
  c.rl.num_iterations = 1  # I, outer iterations (DeepSeekMath Alg. 1), each of M = num_steps / I steps
  c.rl.reset_reference = True  # each iteration starts with reference <- policy (the paper); False: SFT's throughout
  c.rl.num_prompts = 16  # questions per step
  c.rl.group_size = 8  # G, outputs per question (the paper: 64)
  c.rl.num_epochs = 1  # mu, passes over each rollout batch (pi_old fixed during them)
  c.rl.num_minibatches = 1  # gradient steps per pass
  c.rl.clip_eps = 0.2  # epsilon (the lower one when clip_eps_high is set)
  c.rl.clip_eps_high = 0.0  # upper epsilon of the ratio clip (clip-higher, DAPO: 0.28); 0 = clip_eps
  c.rl.dual_clip = 0.0  # c > 1: for A < 0 the objective is floored at c * A (Ye et al. 2020); 0 = off
  c.rl.policy_loss = 'clip'  # per-token objective (core/losses.POLICY_LOSSES): 'clip', the paper's clipped surrogate
  c.rl.importance_ratio = 'token'  # 'token' (the paper) | 'sequence' (GSPO: one length-normalized ratio per output)
  c.rl.loss_aggregation = 'sequence_mean'  # the paper | 'token_mean' (DAPO) | 'constant' (Dr. GRPO) | 'sequence_sum'
  c.rl.entropy_coef = 0.0  # + coef * token entropy in the objective (an entropy bonus); 0 = off
  c.rl.beta = 0.0  # KL weight (the paper: 0.04); > 0 runs the frozen reference each step
  c.rl.kl_estimator = 'k3'  # 'k1' | 'k2' | 'k3' (the paper's) | 'k3_k2grad' (k3's value, k2's unbiased gradient)
  c.rl.kl_in_reward = False  # False: -beta * KL in the loss (GRPO); True: folded into per-token advantages (PPO-style)
  c.rl.kl_target = 0.0  # > 0: a controller moves beta toward this per-token KL (Ziegler et al. 2019); 0 = fixed beta
  c.rl.kl_horizon = 10000  # the controller's horizon in samples: larger moves beta more slowly
  c.rl.kl_adapt = 'beta'  # what the controller moves: 'beta' | 'lr' (a scale on rl.lr's schedule)
  c.rl.exact_kl_rows = 4  # rows per step whose KL to the reference is also computed exactly (full vocabulary); 0 = off
  # Sampling and loss switches (issue 17; all off by default):
  c.rl.dynamic_sampling = False  # DAPO: groups with all G rewards equal are replaced by ones from further prompts
  c.rl.dynamic_sampling_max_draws = 3  # extra prompt batches per step at most; still short: zero-signal groups fill in
  c.rl.overlong_penalty_len = 0  # L_cache (DAPO): reward - 0..1 over the last L_cache tokens of max_new_tokens; 0 = off
  c.rl.mask_truncated = False  # outputs that hit max_new_tokens without an EOS get zero loss weight (DAPO)
  # The reference forward and the update run over the batch's longest completion rounded up to one of this many
  # widths (k / n of max_new_tokens): at most this many compiles of each; 1 = always max_new_tokens wide.
  c.rl.length_buckets = 4
  c.rl.mismatch_rows = 4  # rows per step whose sampler logprobs are checked against the trainer's forward; 0 = off
  c.rl.tis_cap = 0.0  # > 0: truncated importance sampling, token weight min(pi_trainer / pi_sampler, cap); 0 = off
  c.rl.trainer_sampling_filters = False  # True: trainer logprobs of the sampler's temperature/top-k/top-p distribution
  c.rl.advantage = 'grpo'  # 'grpo' (group std-scaled) | 'group_mean' (no std) | 'batch_std' (group mean, batch std)
  c.rl.reward = 'gsm8k_exact'  # the rule reward: registry name in grpo_jax/rewards/registry.py
  c.rl.reward_source = 'verifier'  # 'verifier' (rl.reward) | 'reward_model' (learned, config.reward_model) | 'mix'
  c.rl.reward_mix = 0.5  # 'mix': reward = (1 - w) * rl.reward + w * sigmoid(reward-model score)
  # 'outcome' (one reward per output) | 'process' (per step; DeepSeekMath 4.1.3) | 'prefix_resample' (per segment:
  # the change in Monte Carlo value of the output's prefixes, from continuations; rollout/prefix_credit.py)
  c.rl.supervision = 'outcome'
  c.rl.step_delimiter = '\n'  # process: a step ends at each token containing this; no delimiter = one step
  c.rl.step_verifier = 'arithmetic'  # process: step rewards / labels (grpo_jax/rewards/steps.py)
  c.rl.step_reward = 'verifier'  # process: 'verifier' | 'reward_model' (a process RM trained on the verifier's labels)
  c.rl.prefix_cuts = (0.25, 0.5, 0.75)  # prefix_resample: cuts, increasing fractions in (0, 1) of each output's length
  c.rl.prefix_continuations = 4  # prefix_resample: K continuations sampled per prefix; its value = their mean reward
  c.rl.temperature = 1.0
  c.rl.top_k = 0  # 0 = off
  c.rl.top_p = 1.0  # 1.0 = off
  c.rl.lr = 5e-5  # small: Adam turns sparse-reward noise into full-size steps
  c.rl.warmup_steps = 0
  c.rl.schedule = 'constant'
  c.rl.weight_decay = 0.0
  c.rl.grad_clip = 1.0
  c.rl.grad_accum_steps = 1  # k micro-batches per minibatch, one update (live activations: one micro-batch's)
  c.rl.shared_prompt = True  # update + reference forward run each prompt once for its G outputs; False: once per row
  # With rl.shared_prompt (unused without): each group's outputs are packed end to end into R <= G rows of the batch's
  # width, R rounded up to one of this many fractions k / n of G (a compile per R and width); 0 = off (core/packing.py).
  c.rl.pack_buckets = 8
  c.rl.master_dtype = 'float32'  # params stored narrower (model.param_dtype) train via a master copy; '' = none

  # rl.algorithm='ppo': RLHF PPO on GRPO's data, sampler, reward and rl.* optimizer/clip/epochs; the per-token reward is
  # the outcome at the last token minus rl.beta * (log pi_old - log pi_ref) at every token (no KL term in the loss).
  c.ppo = ml_collections.ConfigDict()
  c.ppo.gamma = 1.0  # GAE's discount gamma (1: the outcome reward reaches every token undiminished)
  c.ppo.lam = 0.95  # GAE's lambda (1: Monte Carlo return minus the value; 0: one-step TD error)
  c.ppo.value_clip = 0.2  # eps of the clipped value loss: a value moves at most this far from its rollout-time value
  c.ppo.whiten_advantages = True  # normalize each batch's per-token advantages to mean 0, std 1 over valid tokens
  c.ppo.critic_warmup_steps = 0  # the first steps train the critic only (the policy is not updated); 0 = off
  c.ppo.lr = 3e-4  # the critic's optimizer (its own AdamW; its value head starts at zero, so it must move fast)
  c.ppo.warmup_steps = 0
  c.ppo.schedule = 'constant'
  c.ppo.weight_decay = 0.0
  c.ppo.grad_clip = 1.0
  c.ppo.master_dtype = 'float32'

  # The learned reward model (models/reward_model.py): the decoder with a scalar head, trained on comparisons before
  # iteration 1 and again after each iteration (new comparisons plus replay). Built when rl.reward_source != 'verifier'.
  c.reward_model = ml_collections.ConfigDict()
  c.reward_model.path = ''  # '' = initialized from the SFT policy's backbone; or a local Hugging Face model directory
  c.reward_model.preference_file = ''  # JSONL {"prompt", "chosen", "rejected"}: pairs for the first training
  c.reward_model.label_samples = True  # compare the policy's own samples, the labeller's higher score preferred
  c.reward_model.labeller = ''  # registry reward labelling them (the RM never sees it); '' = task.verifier
  c.reward_model.num_prompts = 64  # train prompts sampled (G = rl.group_size each) for each (re)training
  c.reward_model.pairs_per_prompt = 4  # comparisons drawn per prompt's group, at most
  c.reward_model.heldout_fraction = 0.25  # of the new prompts (or file pairs): held out, the logged pairwise accuracy
  c.reward_model.num_steps = 60  # updates per (re)training
  c.reward_model.batch_size = 32  # comparisons per update
  c.reward_model.replay_fraction = 0.1  # of each batch drawn from earlier iterations' comparisons (the paper: 10%)
  c.reward_model.replay_capacity = 4096  # comparisons kept for replay (a uniform sample of all seen)
  c.reward_model.lr = 3e-4
  c.reward_model.warmup_steps = 0
  c.reward_model.schedule = 'constant'
  c.reward_model.weight_decay = 0.0
  c.reward_model.grad_clip = 1.0
  c.reward_model.grad_accum_steps = 1
  c.reward_model.master_dtype = 'float32'

  c.lora = ml_collections.ConfigDict()  # low-rank adapters (grpo_jax/models/lora.py); the frozen base is the reference
  c.lora.rank = 0  # r; 0 = off: full fine-tuning
  c.lora.alpha = 16.0  # the update is (alpha / r) * x A B
  c.lora.targets = 'q,k,v,o,gate,up,down'  # projections with adapters: attention q/k/v/o, MLP gate/up/down
  c.lora.stages = 'grpo'  # stages trained with LoRA: 'grpo', 'sft' or 'sft,grpo' (SFT from scratch needs all weights)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 250  # greedy decoding batch for val/test evals
  c.eval.sample = False  # True: score one sample per prompt (rl.temperature) instead of the greedy output

  # CPU only: split the host into this many XLA devices, one core each, so the mesh's data axis spreads every batch
  # over the cores (XLA:CPU runs small ops on one core per device); 0 = one device. Sized for the 2-core default.
  c.cpu_devices = 2
  c.mesh = ml_collections.ConfigDict()  # sizes of the mesh axes; -1 takes the remaining devices
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sharding = ml_collections.ConfigDict()  # logical axis -> mesh axes (explained in grpo_jax/parallel/sharding.py)
  c.sharding.rules = tuple(LOGICAL_RULES.items())  # ((logical axis, mesh axis | (axes, ...) | None), ...), all axes
  c.sharding.sampler_rules = ()  # overrides for the samplers' param layout, e.g. (('embed', None),): no fsdp gathers
  c.sharding.allow_replication_fallback = False  # True: replicate a param dim its mesh axes do not divide, not error

  c.export_hf = False  # also write the final policy as a Hugging Face model to <workdir>/hf_model
  c.checkpoint_every = 50  # steps (per stage); also saved at the end of each stage and on SIGTERM
  c.checkpoint_keep = 2
  c.log_every = 1  # steps between metric fetches from device
  c.max_nonfinite_steps = 10  # a step with a non-finite loss / gradient is skipped; this many in a row stop the run
  c.compile_cache_dir = ''  # e.g. ~/.cache/grpo_jax/xla: reruns and resumed runs load compiled steps from it
  # Before the first step, the GRPO step's memory plan (grpo_jax.plan, compiled on the run's mesh) against the memory
  # this process has (host RAM on CPU): 'auto' = for real models (model.path set) | 'on' | 'off'
  c.memory_check = 'auto'
  c.memory_limit_gib = 0.0  # the budget memory_check plans against; 0 = what this process has

  if arg == 'tiny':  # a CPU smoke run: every stage, a few steps each
    c.task.num_train, c.task.num_val, c.task.num_test = 256, 16, 32
    c.model.d_model, c.model.num_layers, c.model.mlp_dim, c.model.head_dim = 32, 2, 64, 8
    c.sft.batch_size, c.sft.max_steps, c.sft.eval_every, c.sft.warmup_steps = 8, 6, 3, 2
    c.rl.num_steps, c.rl.num_prompts, c.rl.group_size = 4, 4, 4
    c.rl.num_epochs, c.rl.num_minibatches, c.rl.beta = 2, 2, 0.04
    # 6 SFT steps leave near-random text that gsm8k_exact scores 0 in every group: no advantage, KL-only updates.
    # A shaping reward with partial credit gives groups reward variance, so smoke/resume/sharding runs test the
    # policy-gradient path; task.verifier stays gsm8k_exact, so the reported accuracy is still exact.
    c.rl.reward = 'gsm8k_partial'
    c.reward_model.num_prompts, c.reward_model.num_steps, c.reward_model.batch_size = 8, 4, 8
    c.reward_model.labeller = 'gsm8k_partial'  # as rl.reward: exact answers never occur after 6 SFT steps
    c.eval.batch_size = 16
    c.checkpoint_every = 2
  elif arg == 'numbers':  # the non-verifiable task (data/numbers_task.py): GRPO on a learned reward model alone
    c.task.name, c.task.verifier, c.rl.reward = 'numbers', 'numbers_hidden', 'numbers_hidden'  # the hidden rater
    c.rl.reward_source = 'reward_model'  # the rater only labels comparisons and scores the evaluation
    c.sft.max_steps, c.sft.target_accuracy = 400, 1.0  # no verifier to stop on: a fixed SFT length
    c.rl.lr = 2e-4
    c.reward_model.num_prompts, c.reward_model.num_steps = 256, 150  # comparisons are cheap; the 64-prompt default
    c.eval.sample = True  # greedy decoding of this task's SFT policy repeats one number, which the rater scores 0
  elif arg == 'sft_matched':  # the control: SFT alone, continued on its own data for the default's GRPO wall time
    # 870 more SFT steps take what the 200 GRPO steps take on 2 CPU cores (README); no GRPO stage.
    c.sft.max_steps, c.rl.num_steps = 1500 + 870, 0
  elif arg == 'ppo':  # the PPO baseline (the paper's ablation row): the default with a critic in place of the group
    c.rl.algorithm = 'ppo'
    c.rl.beta = 0.04  # the paper's beta, here the per-token KL penalty in the reward (DeepSeekMath eq. 2), as RLHF PPO
    # The critic's head starts at zero (every value 0): critic-only steps first, so the policy's first updates see
    # a baseline fitted to the SFT policy's returns rather than the raw rewards.
    c.ppo.critic_warmup_steps = 10
  elif arg == 'paper':  # DeepSeekMath's GRPO choices (Shao et al. 2024) on the embedded task
    paper_grpo(c)
  elif arg:
    raise ValueError(f'unknown preset {arg!r}; known: tiny, numbers, sft_matched, ppo, paper')
  return c


def paper_grpo(c: ml_collections.ConfigDict) -> None:
  """DeepSeekMath's GRPO (Shao et al. 2024, arXiv:2402.03300), each choice where the paper makes it."""
  c.rl.beta = 0.04  # Sec. 4.2: "The KL coefficient is 0.04"
  c.rl.kl_estimator = 'k3'  # Sec. 4.1.1, eq. 4: the unbiased estimator pi_ref/pi - log(pi_ref/pi) - 1
  c.rl.advantage = 'grpo'  # Sec. 4.1.2: rewards normalized by the group's mean and std, every token of o_i gets A_i
  c.rl.loss_aggregation = 'sequence_mean'  # Sec. 4.1.1, eq. 3: (1/G) sum_i (1/|o_i|) sum_t
  c.rl.policy_loss = 'clip'  # eq. 3: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), PPO's clipped surrogate
  c.rl.importance_ratio = 'token'  # eq. 3: the per-token ratio pi_theta(o_it) / pi_old(o_it)
  c.rl.clip_eps, c.rl.clip_eps_high, c.rl.dual_clip = 0.2, 0.0, 0.0  # eq. 3's symmetric clip; 0.2: see below
  c.rl.kl_in_reward = False  # Sec. 4.1.1: GRPO adds the KL to the loss, not to the reward as PPO does (eq. 2)
  c.rl.entropy_coef = 0.0  # eq. 3 has no entropy term
  c.rl.supervision = 'outcome'  # Sec. 4.1.2, outcome supervision (process supervision, 4.1.3, is 'process')
  c.rl.num_epochs, c.rl.num_minibatches = 1, 1  # Sec. 4.2: "a single update following each exploration stage"
  c.rl.num_iterations = 1  # Alg. 1 with I = 1 (iterative RL, Sec. 4.1.4, is rl.num_iterations > 1)
  c.rl.group_size = 64  # G; Sec. 4.2: "For each question, we sample 64 outputs"
  c.rl.num_prompts = 16  # x G = 1024 outputs per step; Sec. 4.2: "the training batch size is 1024"
  c.rl.temperature, c.rl.top_k, c.rl.top_p = 1.0, 0, 1.0  # not stated in the paper: plain sampling
  # Where the embedded task differs from the paper, and why:
  # - rl.lr stays 5e-5 (the paper: 1e-6, Sec. 4.2, for a 7B instruct model): the default's rate was chosen on this
  #   0.45M model (README); a 50x smaller one is not expected to move it within 200 steps.
  # - max_new_tokens stays 40 (the paper: max length 1024, Sec. 4.2): the task's solutions are under 40 tokens.
  # - The reward is the rule verifier (rl.reward), not the paper's learned reward model (Sec. 4.2).
  # - clip_eps 0.2 is PPO's usual value; the paper does not state its epsilon.
  # - G=64 samples 8x the default's outputs per step: expect about 8x the default's GRPO wall time.
