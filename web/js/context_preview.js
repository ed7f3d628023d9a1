// AnimateDiff Suite: a preview of the context windows on Context Options (and Preview Context Windows),
// redrawn as the settings or the frame count change, with invalid settings marked before queueing.
// The frame count comes from the graph (the Empty Latent Image that the sampler of this motion model
// reads) where it says so, else from the node's "preview frames" widget; the frame limit from Load
// Motion Model once it ran. Only this pack's nodes are touched; overridden handlers are chained.
import { app } from "../../scripts/app.js";
import { contextWindows, fuseWeights, validate } from "./context_schedule.js";

const PREVIEW = "schedule_preview";
const FRAMES_WIDGET = "preview frames";
const STEPS = 4;
const HEIGHT = 180;
const COLORS = ["#4e9af1", "#f1a14e", "#5bc46a", "#d65db1", "#e5d04b", "#49c6c6"];

const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;

function linkOrigin(link) {
    const info = app.graph.links?.[link] ?? app.graph.links?.get?.(link);
    return info ? app.graph.getNodeById(info.origin_id) : null;
}

function targets(node) {
    const out = [];
    for (const output of node.outputs ?? []) {
        for (const link of output.links ?? []) {
            const info = app.graph.links?.[link] ?? app.graph.links?.get?.(link);
            const target = info && app.graph.getNodeById(info.target_id);
            if (target) out.push(target);
        }
    }
    return out;
}

function inputOrigin(node, name) {
    const input = node?.inputs?.find((i) => i.name === name);
    return input?.link != null ? linkOrigin(input.link) : null;
}

/** The context settings a node previews: its own widgets, or those of the Context Options it reads. */
function settingsOf(node) {
    const source = node.type === "ADS_ContextOptions" ? node : inputOrigin(node, "context_options");
    if (!source || source.type !== "ADS_ContextOptions") return null;
    const names = ["context_length", "context_overlap", "context_stride", "closed_loop", "schedule", "fuse_method",
                   "stretch_pe"];
    return Object.fromEntries(names.map((n) => [n, widgetValue(source, n)]));
}

/** {frames, source, frameLimit}: the frame count from the graph where it says it, else the widget. */
function clipOf(node) {
    if (node.type === "ADS_ContextScheduleImage") {
        return { frames: widgetValue(node, "frames"), source: "frames", frameLimit: null };
    }
    let frameLimit = null;
    const seen = new Set(), queue = [[node, 0]];
    while (queue.length) {
        const [current, depth] = queue.shift();
        if (seen.has(current.id) || depth > 6) continue;
        seen.add(current.id);
        if (current.type === "ADS_ApplyMotionModel") {
            frameLimit = inputOrigin(current, "motion_model")?.adsFrameLimit ?? frameLimit;
        }
        const latent = inputOrigin(current, "latent_image");
        const batch = widgetValue(latent, "batch_size") ?? widgetValue(latent, "amount");
        if (Number.isInteger(batch)) return { frames: batch, source: `${latent.title ?? latent.type}`, frameLimit };
        for (const next of targets(current)) queue.push([next, depth + 1]);
    }
    return { frames: widgetValue(node, FRAMES_WIDGET), source: FRAMES_WIDGET, frameLimit };
}

/** What the preview shows: windows for the first STEPS steps, step 0's fuse weights, problems. */
export function previewModel(options, frames, frameLimit = null) {
    const problems = validate(options, frameLimit);
    if (!(frames >= 1)) problems.push(`the frame count must be at least 1 (is ${frames})`);
    if (problems.length) return { frames, steps: [], weights: [], problems };
    const steps = [...Array(STEPS).keys()].map((s) => contextWindows(frames, options, s));
    const weights = steps[0].map((w) => fuseWeights(w, frames, options));
    return { frames, steps, weights, problems };
}

/** Draw a preview model on a canvas: a row per window per step (frames across), then step 0's fuse
 *  weights per window (each normalised to its peak), then a caption or the problems in red. */
export function renderSchedule(canvas, model, caption = "") {
    const ctx = canvas.getContext("2d");
    const width = canvas.width, height = canvas.height;
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(0, 0, width, height);
    ctx.font = "11px sans-serif";
    if (model.problems.length) {
        ctx.fillStyle = "#ff5a5a";
        model.problems.slice(0, 6).forEach((p, i) => ctx.fillText(`⚠ ${p}`, 6, 16 + 15 * i));
        return;
    }
    const left = 4, cell = (width - 2 * left) / model.frames;
    const rows = model.steps.reduce((n, windows) => n + windows.length, 0) + model.steps.length - 1;
    const gridHeight = height - 62, rowHeight = Math.max(1, Math.min(6, Math.floor(gridHeight / Math.max(rows, 1))));
    let y = 2;
    model.steps.forEach((windows, s) => {
        windows.forEach((window, k) => {
            ctx.fillStyle = COLORS[k % COLORS.length];
            for (const f of window) ctx.fillRect(left + f * cell, y, Math.max(1, cell - (cell > 3 ? 1 : 0)), rowHeight - 1);
            y += rowHeight;
        });
        if (s < model.steps.length - 1) y += rowHeight;
    });
    const base = height - 18, top = height - 56;
    ctx.strokeStyle = "#555";
    ctx.strokeRect(left, top, width - 2 * left, base - top);
    model.steps[0].forEach((window, k) => {
        const peak = Math.max(...model.weights[k]);
        ctx.strokeStyle = COLORS[k % COLORS.length];
        ctx.beginPath();
        window.forEach((f, i) => {
            const x = left + (f + 0.5) * cell, yy = base - (model.weights[k][i] / peak) * (base - top - 2);
            i ? ctx.lineTo(x, yy) : ctx.moveTo(x, yy);
        });
        ctx.stroke();
    });
    ctx.fillStyle = "#ccc";
    ctx.fillText(caption, 6, height - 4);
}

function attachPreview(node) {
    if (node.widgets?.some((w) => w.name === PREVIEW)) return;
    if (node.type === "ADS_ContextOptions") {
        const frames = node.addWidget("number", FRAMES_WIDGET, 64, () => {}, { min: 1, max: 4096, step: 10, precision: 0 });
        frames.serialize = false;  // a preview setting: never saved or queued
        frames.options.serialize = false;
    }
    const canvas = document.createElement("canvas");
    canvas.className = "ads-schedule-preview";
    canvas.style.width = "100%";
    const widget = node.addDOMWidget(PREVIEW, "ads_schedule_preview", canvas, {
        serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {},
        getMinHeight: () => HEIGHT, getMaxHeight: () => HEIGHT,
    });
    widget.serialize = false;
    node.adsPreview = { canvas, key: null, model: null };
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function refresh(node) {
    const state = node.adsPreview;
    const options = state && settingsOf(node);
    if (!options) return;
    const clip = clipOf(node);
    const width = Math.max(120, Math.round(node.size[0] - 20));
    const key = JSON.stringify([options, clip, width]);
    if (key === state.key) return;
    state.key = key;
    state.canvas.width = width;
    state.canvas.height = HEIGHT;
    state.model = previewModel(options, clip.frames, clip.frameLimit);
    state.clip = clip;
    const windows = state.model.steps[0]?.length ?? 0;
    renderSchedule(state.canvas, state.model,
        `${clip.frames} frames from ${clip.source} · ${windows} window${windows === 1 ? "" : "s"} · steps 0-${STEPS - 1}`);
}

app.registerExtension({
    name: "AnimateDiffSuite.ContextPreview",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name === "ADS_LoadMotionModel") {
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                const result = onExecuted?.apply(this, arguments);
                const limit = /up to (\d+) frames/.exec(message?.text?.join("\n") ?? "");
                if (limit) this.adsFrameLimit = Number(limit[1]);
                return result;
            };
            return;
        }
        if (nodeData?.name !== "ADS_ContextOptions" && nodeData?.name !== "ADS_ContextScheduleImage") return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            attachPreview(this);
            return result;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            const size = this.computeSize();  // a saved size from before the preview existed
            this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
            return result;
        };
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function () {
            const result = onDrawForeground?.apply(this, arguments);
            refresh(this);
            return result;
        };
    },
});
