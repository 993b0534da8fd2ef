"""LLaMA-Board (``llamafactory-cli webui``) pieces of the reference-aware stages: stage labels, the reference
controls and their translations, the arguments they produce, and the live deviation plot.

``integration`` hooks these into LLaMA-Factory's web UI modules; nothing here patches anything itself.
"""

import json
import os
from typing import Any, Callable

from . import REFERENCE_SFT_STAGES


#: label → stage, appended to LLaMA-Factory's TRAINING_STAGES (its stage labels are the same in every language)
STAGE_LABELS = {"MinorSFT": "minorsft", "SFT using DPO": "sft_dpo"}
DEVIATION_LOG = "trainer_deviation.jsonl"  # beside LLaMA-Factory's trainer_log.jsonl, read by the live plot

LOCALES = {
    "ref_tab": {
        "en": {"label": "Reference model (MinorSFT, SFT using DPO, deviation)"},
        "ru": {"label": "Эталонная модель (MinorSFT, SFT using DPO, отклонение)"},
        "zh": {"label": "参考模型（MinorSFT、SFT using DPO、偏移度）"},
        "ko": {"label": "참조 모델 (MinorSFT, SFT using DPO, 편차)"},
        "ja": {"label": "参照モデル（MinorSFT、SFT using DPO、乖離度）"},
    },
    "ref_model": {
        "en": {"label": "Reference model path", "info": "Empty: the initial model (LoRA: adapters disabled). Beta is set under RLHF configurations."},
        "ru": {"label": "Путь к эталонной модели", "info": "Пусто: исходная модель (LoRA: адаптеры отключены). Бета задаётся в конфигурациях RLHF."},
        "zh": {"label": "参考模型路径", "info": "留空：使用初始模型（LoRA：禁用适配器）。Beta 在 RLHF 参数设置中设定。"},
        "ko": {"label": "참조 모델 경로", "info": "비워 두면 초기 모델 (LoRA: 어댑터 비활성화). 베타는 RLHF 구성에서 설정합니다."},
        "ja": {"label": "参照モデルのパス", "info": "空欄：初期モデル（LoRA：アダプタ無効）。Beta は RLHF 設定で指定します。"},
    },
    "track_deviation": {
        "en": {"label": "Track deviation", "info": "Supervised Fine-Tuning only: log the deviation from the reference model."},
        "ru": {"label": "Отслеживать отклонение", "info": "Только для SFT: записывать отклонение от эталонной модели."},
        "zh": {"label": "记录偏移度", "info": "仅用于监督微调：记录相对参考模型的偏移度。"},
        "ko": {"label": "편차 추적", "info": "지도 미세 조정 전용: 참조 모델과의 편차를 기록합니다."},
        "ja": {"label": "乖離度を記録", "info": "教師ありファインチューニングのみ：参照モデルからの乖離度を記録します。"},
    },
    "precompute_ref_logps": {
        "en": {"label": "Precompute reference log-probs", "info": "One reference pass before training, cached; then the reference is released."},
        "ru": {"label": "Предвычислить log-вероятности эталона", "info": "Один проход эталона до обучения с кэшем; затем эталон выгружается."},
        "zh": {"label": "预计算参考模型对数概率", "info": "训练前计算一次并缓存，随后释放参考模型。"},
        "ko": {"label": "참조 로그 확률 사전 계산", "info": "학습 전에 한 번 계산해 캐시하고 참조 모델을 해제합니다."},
        "ja": {"label": "参照の対数確率を事前計算", "info": "学習前に一度だけ計算してキャッシュし、参照モデルを解放します。"},
    },
}  # fmt: skip


def create_reference_elems() -> dict[str, Any]:
    """The reference controls, created unrendered: they join the train tab's inputs before it is built."""
    import gradio as gr

    return dict(
        ref_model=gr.Textbox(value="", render=False),
        track_deviation=gr.Checkbox(value=False, render=False),
        precompute_ref_logps=gr.Checkbox(value=False, render=False),
    )


def render_reference_elems(elems: dict[str, Any]) -> dict[str, Any]:
    """Place the controls in their own accordion of the train tab; returns them with the accordion."""
    import gradio as gr

    with gr.Accordion(open=False) as ref_tab:
        with gr.Row():
            elems["ref_model"].render()
            elems["track_deviation"].render()
            elems["precompute_ref_logps"].render()

    return dict(ref_tab=ref_tab, **elems)


def add_reference_args(args: dict[str, Any], get: Callable[[str], Any]) -> dict[str, Any]:
    """Complete the train arguments LLaMA-Board built (``get`` reads a UI value by element id)."""
    track = args["stage"] == "sft" and bool(get("train.track_deviation"))
    if args["stage"] in REFERENCE_SFT_STAGES or track:
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

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_and_deviation_plot(trainer_log: list[dict[str, Any]], deviation_log: list[dict[str, Any]]):
    """LLaMA-Board's live loss plot, with the deviation (Eq. 8) in a second panel below it."""
    import matplotlib.pyplot as plt

    from llamafactory.extras.ploting import smooth

    plt.close("all")
    plt.switch_backend("agg")
    fig, (loss_ax, deviation_ax) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 6.4))
    for ax, log, key in ((loss_ax, trainer_log, "loss"), (deviation_ax, deviation_log, "deviation")):
        points = [(entry["current_steps"], entry[key]) for entry in log if entry.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
            ax.legend()
        ax.set_ylabel(key)
    deviation_ax.set_xlabel("step")
    fig.tight_layout()
    return fig
