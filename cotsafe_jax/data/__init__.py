"""cotsafe_jax.data: local row sources with column maps, training mixtures (decontaminated, weighted, with
statistics), the grain batch pipeline, the synthetic demo task."""
from cotsafe_jax.data.mixture import (Dedup, EvalIndex, TrainingData, format_stats, mixture_stats, normalize_words,
                                      training_data, word_ngrams)
from cotsafe_jax.data.pipeline import BatchIterator, kind_counts, make_pipeline
from cotsafe_jax.data.sources import (GRADERS, KINDS, PRESETS, ColumnPreset, Rows, Source, SourceRows,
                                      load_prompts, load_rows, load_sft, load_sources, load_spans)
from cotsafe_jax.data.synthetic import (SyntheticTask, extract_answer, find_unsafe_spans, is_reflection,
                                        is_refusal, is_unsafe_phrase, judge_answer_unsafe,
                                        judge_reasoning_unsafe, judge_response, make_task, render_prompt,
                                        render_response, solve, train_tokenizer, write_task)

__all__ = [
    "BatchIterator", "ColumnPreset", "Dedup", "EvalIndex", "GRADERS", "KINDS", "PRESETS", "Rows", "Source",
    "SourceRows", "SyntheticTask", "TrainingData", "extract_answer", "format_stats", "mixture_stats",
    "normalize_words", "training_data", "word_ngrams",
    "find_unsafe_spans", "is_reflection", "is_refusal", "is_unsafe_phrase", "judge_answer_unsafe",
    "judge_reasoning_unsafe", "judge_response", "kind_counts", "load_prompts", "load_rows", "load_sft",
    "load_sources", "load_spans", "make_pipeline", "make_task", "render_prompt", "render_response", "solve",
    "train_tokenizer", "write_task",
]
