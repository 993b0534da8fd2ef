"""LLaMA-Board (``llamafactory-cli webui``) pieces of this package's stages.

LLaMA-Board (``llamafactory-cli webui``) pieces of this package's stages: stage labels, the reference and
SFT-GO controls and their translations, which controls each stage shows, the arguments they produce, and the
live deviation plot.

``integration`` hooks these into LLaMA-Factory's web UI modules; nothing here patches anything itself.
"""

import json
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from .sft_go import GROUP_REDUCTIONS, GROUPINGS, LAMBDA_SCHEDULES
from .stages import NEW_STAGES, SFT_GO_STAGE, uses_reference
from .train.callbacks import DEVIATION_LOG


#: label → stage, appended to LLaMA-Factory's TRAINING_STAGES (its stage labels are the same in every language)
STAGE_LABELS = {"MinorSFT": "minorsft", "SFT using DPO": "sft_dpo", "SFT-GO": "sft_go"}

LOCALES = {
    "ref_tab": {
        "en": {"label": "Reference model (MinorSFT, SFT using DPO, deviation)"},
        "ru": {"label": "Эталонная модель (MinorSFT, SFT using DPO, отклонение)"},
        "zh": {"label": "参考模型（MinorSFT、SFT using DPO、偏移度）"},
        "ko": {"label": "참조 모델 (MinorSFT, SFT using DPO, 편차)"},
        "ja": {"label": "参照モデル（MinorSFT、SFT using DPO、乖離度）"},
    },
    "ref_model": {
        "en": {
            "label": "Reference model path",
            "info": "Empty: the initial model (LoRA: adapters disabled). Beta is set under RLHF configurations.",
        },
        "ru": {
            "label": "Путь к эталонной модели",
            "info": "Пусто: исходная модель (LoRA: адаптеры отключены). Бета задаётся в конфигурациях RLHF.",
        },
        "zh": {
            "label": "参考模型路径",
            "info": "留空：使用初始模型（LoRA：禁用适配器）。Beta 在 RLHF 参数设置中设定。",
        },
        "ko": {
            "label": "참조 모델 경로",
            "info": "비워 두면 초기 모델 (LoRA: 어댑터 비활성화). 베타는 RLHF 구성에서 설정합니다.",
        },
        "ja": {
            "label": "参照モデルのパス",
            "info": "空欄：初期モデル（LoRA：アダプタ無効）。Beta は RLHF 設定で指定します。",
        },
    },
    "track_deviation": {
        "en": {
            "label": "Track deviation",
            "info": "Supervised Fine-Tuning and SFT-GO: log the deviation from the reference model.",
        },
        "ru": {
            "label": "Отслеживать отклонение",
            "info": "Для SFT и SFT-GO: записывать отклонение от эталонной модели.",
        },
        "zh": {"label": "记录偏移度", "info": "用于监督微调和 SFT-GO：记录相对参考模型的偏移度。"},
        "ko": {"label": "편차 추적", "info": "지도 미세 조정과 SFT-GO: 참조 모델과의 편차를 기록합니다."},
        "ja": {
            "label": "乖離度を記録",
            "info": "教師ありファインチューニングと SFT-GO：参照モデルからの乖離度を記録します。",
        },
    },
    "precompute_ref_logps": {
        "en": {
            "label": "Precompute reference log-probs",
            "info": "One reference pass before training, cached; then the reference is released.",
        },
        "ru": {
            "label": "Предвычислить log-вероятности эталона",
            "info": "Один проход эталона до обучения с кэшем; затем эталон выгружается.",
        },
        "zh": {"label": "预计算参考模型对数概率", "info": "训练前计算一次并缓存，随后释放参考模型。"},
        "ko": {"label": "참조 로그 확률 사전 계산", "info": "학습 전에 한 번 계산해 캐시하고 참조 모델을 해제합니다."},
        "ja": {
            "label": "参照の対数確率を事前計算",
            "info": "学習前に一度だけ計算してキャッシュし、参照モデルを解放します。",
        },
    },
    "sft_go_tab": {
        "en": {"label": "SFT-GO (group-optimized SFT)"},
        "ru": {"label": "SFT-GO (SFT с групповой оптимизацией)"},
        "zh": {"label": "SFT-GO（分组优化监督微调）"},
        "ko": {"label": "SFT-GO (그룹 최적화 SFT)"},
        "ja": {"label": "SFT-GO（グループ最適化 SFT）"},
    },
    "sft_go_grouping": {
        "en": {
            "label": "Token grouping",
            "info": "tfidf: no extra model; rho1: excess loss against the reference; llmlingua2: a token classifier.",
        },
        "ru": {
            "label": "Группировка токенов",
            "info": "tfidf: без доп. модели; rho1: избыточная потеря относительно эталона; llmlingua2: классификатор токенов.",
        },
        "zh": {
            "label": "词元分组",
            "info": "tfidf：无需额外模型；rho1：相对参考模型的超额损失；llmlingua2：词元分类模型。",
        },
        "ko": {
            "label": "토큰 그룹화",
            "info": "tfidf: 추가 모델 없음; rho1: 참조 대비 초과 손실; llmlingua2: 토큰 분류 모델.",
        },
        "ja": {
            "label": "トークンのグループ化",
            "info": "tfidf：追加モデル不要；rho1：参照に対する超過損失；llmlingua2：トークン分類モデル。",
        },
    },
    "sft_go_eta": {
        "en": {"label": "Important fraction (η)", "info": "The share of each answer's tokens in the important group."},
        "ru": {"label": "Доля важных токенов (η)", "info": "Доля токенов каждого ответа в группе важных."},
        "zh": {"label": "重要比例 (η)", "info": "每个回答中划入重要组的词元比例。"},
        "ko": {"label": "중요 비율 (η)", "info": "각 답변에서 중요 그룹에 속하는 토큰의 비율."},
        "ja": {"label": "重要トークンの割合 (η)", "info": "各回答のうち重要グループに入るトークンの割合。"},
    },
    "sft_go_lambda": {
        "en": {
            "label": "Worst-group weight (λ)",
            "info": "L = (1 − λ)·CE + λ·max(group losses); the start value of a schedule.",
        },
        "ru": {
            "label": "Вес худшей группы (λ)",
            "info": "L = (1 − λ)·CE + λ·max(потерь групп); начальное значение расписания.",
        },
        "zh": {"label": "最差组权重 (λ)", "info": "L = (1 − λ)·CE + λ·max(各组损失)；调度的初始值。"},
        "ko": {"label": "최악 그룹 가중치 (λ)", "info": "L = (1 − λ)·CE + λ·max(그룹 손실); 스케줄의 시작 값."},
        "ja": {
            "label": "最悪グループの重み (λ)",
            "info": "L = (1 − λ)·CE + λ·max(グループ損失)；スケジュールの初期値。",
        },
    },
    "sft_go_lambda_schedule": {
        "en": {"label": "λ schedule", "info": "constant, or decay to 0 over training."},
        "ru": {"label": "Расписание λ", "info": "constant или спад до 0 за время обучения."},
        "zh": {"label": "λ 调度", "info": "constant，或在训练中衰减到 0。"},
        "ko": {"label": "λ 스케줄", "info": "constant 또는 학습 동안 0으로 감소."},
        "ja": {"label": "λ のスケジュール", "info": "constant、または学習中に 0 まで減衰。"},
    },
    "sft_go_group_reduction": {
        "en": {
            "label": "Group losses",
            "info": "batch: each group's token mean over the batch (Group DRO); sample: per sample, then averaged.",
        },
        "ru": {
            "label": "Потери групп",
            "info": "batch: среднее по токенам группы во всём батче (Group DRO); sample: по каждому примеру, затем среднее.",
        },
        "zh": {
            "label": "组损失",
            "info": "batch：每组在整个批次上的词元平均（Group DRO）；sample：逐样本计算后取平均。",
        },
        "ko": {
            "label": "그룹 손실",
            "info": "batch: 배치 전체에서 그룹별 토큰 평균 (Group DRO); sample: 샘플별 계산 후 평균.",
        },
        "ja": {
            "label": "グループ損失",
            "info": "batch：バッチ全体でのグループごとのトークン平均（Group DRO）；sample：サンプルごとに計算して平均。",
        },
    },
    "sft_go_classifier": {
        "en": {
            "label": "LLMLingua-2 classifier path",
            "info": "A local 2-label token-classification model (llmlingua2 grouping only).",
        },
        "ru": {
            "label": "Путь к классификатору LLMLingua-2",
            "info": "Локальная модель классификации токенов с 2 метками (только llmlingua2).",
        },
        "zh": {"label": "LLMLingua-2 分类模型路径", "info": "本地二分类词元分类模型（仅用于 llmlingua2 分组）。"},
        "ko": {
            "label": "LLMLingua-2 분류 모델 경로",
            "info": "로컬 2-레이블 토큰 분류 모델 (llmlingua2 그룹화 전용).",
        },
        "ja": {
            "label": "LLMLingua-2 分類モデルのパス",
            "info": "ローカルの 2 ラベルのトークン分類モデル（llmlingua2 のみ）。",
        },
    },
}


def create_elems() -> dict[str, Any]:
    """The new controls, created unrendered: they join the train tab's inputs before it is built."""
    import gradio as gr

    return dict(
        ref_model=gr.Textbox(value="", render=False),
        track_deviation=gr.Checkbox(value=False, render=False),
        precompute_ref_logps=gr.Checkbox(value=False, render=False),
        sft_go_grouping=gr.Dropdown(choices=list(GROUPINGS), value="tfidf", render=False),
        sft_go_eta=gr.Slider(minimum=0.05, maximum=0.95, value=0.5, step=0.05, render=False),
        sft_go_lambda=gr.Slider(minimum=0.0, maximum=1.0, value=0.9, step=0.05, render=False),
        sft_go_lambda_schedule=gr.Dropdown(choices=list(LAMBDA_SCHEDULES), value="linear", render=False),
        sft_go_group_reduction=gr.Dropdown(choices=list(GROUP_REDUCTIONS), value="batch", render=False),
        sft_go_classifier=gr.Textbox(value="", render=False),
    )


def render_elems(elems: dict[str, Any]) -> dict[str, Any]:
    """Render the controls in two accordions; returns them with the accordions (SFT-GO's starts hidden)."""
    import gradio as gr

    with gr.Accordion(open=False) as ref_tab:
        with gr.Row():
            for name in ("ref_model", "track_deviation", "precompute_ref_logps"):
                elems[name].render()

    with gr.Accordion(open=False, visible=False) as sft_go_tab:
        with gr.Row():
            for name in elems:
                if name.startswith("sft_go_"):
                    elems[name].render()

    return dict(ref_tab=ref_tab, sft_go_tab=sft_go_tab, **elems)


def place_after(anchor: Any, blocks: list[Any]) -> None:
    """Move rendered ``blocks`` right after ``anchor`` in its container (the layout is read at launch)."""
    children = anchor.parent.children
    for block in blocks:
        block.parent.children.remove(block)
        block.parent = anchor.parent

    position = children.index(anchor) + 1
    children[position:position] = blocks


def stage_visibility(stage: str, num_stock: int) -> list[Any]:
    """Visibility updates on a stage change.

    Visibility updates on a stage change: ``num_stock`` stock RLHF controls that do nothing for the new stages,
    then the reference accordion (sft and the new stages), the SFT-GO accordion and `track_deviation` (sft and
    sft_go: minorsft and sft_dpo always log the deviation).
    """
    import gradio as gr

    stock = [gr.update(visible=stage not in NEW_STAGES)] * num_stock
    ours = [stage in ("sft", *NEW_STAGES), stage == SFT_GO_STAGE, stage in ("sft", SFT_GO_STAGE)]
    return [*stock, *(gr.update(visible=visible) for visible in ours)]


def add_args(args: dict[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    """Complete the train arguments LLaMA-Board built (``get`` reads a UI value by element id)."""
    stage = args["stage"]
    track = stage in ("sft", SFT_GO_STAGE) and bool(get("train.track_deviation"))
    if stage == SFT_GO_STAGE:
        for name in ("sft_go_grouping", "sft_go_eta", "sft_go_lambda", "sft_go_lambda_schedule"):
            args[name] = get(f"train.{name}")
        args["sft_go_group_reduction"] = get("train.sft_go_group_reduction")
        if args["sft_go_grouping"] == "llmlingua2":
            args["sft_go_classifier"] = (get("train.sft_go_classifier") or "").strip() or None

    if uses_reference(SimpleNamespace(**{**args, "track_deviation": track})):
        args["pref_beta"] = get("train.pref_beta")
        if track:
            args["track_deviation"] = True
        if (get("train.ref_model") or "").strip():
            args["ref_model"] = get("train.ref_model").strip()
        if get("train.precompute_ref_logps"):
            args["precompute_ref_logps"] = True

    return args


def read_deviation_log(output_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(output_dir, DEVIATION_LOG)
    if not os.path.isfile(path):
        return []

    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line being written (or a damaged one): it must not stop the monitor
                continue
            if isinstance(entry, dict) and "current_steps" in entry:
                entries.append(entry)
    return entries


#: seconds of slack in ``deviation_log_is_current``: the elapsed time is whole seconds, and a thread writes the log
START_SLACK_S = 2.0


def _seconds(elapsed: str) -> float:
    """``str(timedelta)`` back to seconds: "0:01:05", "2 days, 3:04:05"."""
    days, _, clock = elapsed.rpartition(", ")
    hours, minutes, seconds = (float(part) for part in clock.split(":"))
    return (int(days.split()[0]) if days else 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def deviation_log_is_current(output_dir: str, trainer_log: list[dict[str, Any]]) -> bool:
    """Whether ``trainer_deviation.jsonl`` was written by the run that writes ``trainer_log`` now.

    A stock run (no deviation) in a folder where a plugin run left its deviation log does not touch that file, so
    its last write precedes the running run's start: the trainer log's last write less its last elapsed time. A
    resumed plugin run touches its log as it starts (``DeviationLogCallback``), before its first entry.
    """
    from llamafactory.extras.constants import TRAINER_LOG

    try:
        started = os.path.getmtime(os.path.join(output_dir, TRAINER_LOG)) - _seconds(trainer_log[-1]["elapsed_time"])
        written = os.path.getmtime(os.path.join(output_dir, DEVIATION_LOG))
    except (OSError, IndexError, KeyError, TypeError, ValueError):  # no log yet, or one this check cannot read
        return False
    return written >= started - START_SLACK_S


def loss_and_deviation_plot(trainer_log: list[dict[str, Any]], deviation_log: list[dict[str, Any]]):
    """LLaMA-Board's live loss plot, with the deviation (Eq. 8) in a second panel below it."""
    import matplotlib.pyplot as plt
    from llamafactory.extras.ploting import smooth

    from .tools.figures import point_marker

    plt.close("all")
    plt.switch_backend("agg")
    fig, (loss_ax, deviation_ax) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 6.4))
    for ax, log, key in ((loss_ax, trainer_log, "loss"), (deviation_ax, deviation_log, "deviation")):
        points = [(entry["current_steps"], entry[key]) for entry in log if entry.get(key) is not None]
        if points:
            steps, values = zip(*points)
            marker = point_marker(values)  # the first log of a run: a point, not a line
            ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original", marker=marker)
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed", marker=marker)
            ax.legend()
        ax.set_ylabel(key)
    deviation_ax.set_xlabel("step")
    fig.tight_layout()
    return fig
