// AnimateDiff Suite: the context-window schedules and fuse weights of motion_modules/context.py, in JS,
// for drawing them in the editor. Pure functions (no ComfyUI imports); tests/test_web_schedule.py checks
// them against the vectors the Python core exports (tests/vectors/context_schedules.json), so the two
// cannot drift. Windows are arrays of frame indices; every schedule is (frames, options, step) -> windows.

export const SCHEDULES = ["batched", "looped_uniform", "shifted_static", "standard_static", "standard_uniform"];
export const FUSE_METHODS = ["delayed_reverse_sawtooth", "flat", "gaussian", "overlap-linear", "pyramid"];

/** Bit-reversed step / 2^64: 0, 1/2, 1/4, 3/4, 1/8, ... (exact for any step below 2^53). */
export function orderedHalving(step) {
    let value = 0, weight = 0.5;
    for (let s = step; s > 0; s = Math.floor(s / 2), weight /= 2) {
        if (s % 2) value += weight;
    }
    return value;
}

/** Python's round(): halves go to the even neighbour. */
function roundHalfEven(x) {
    const floor = Math.floor(x), diff = x - floor;
    if (diff > 0.5) return floor + 1;
    if (diff < 0.5) return floor;
    return floor % 2 === 0 ? floor : floor + 1;
}

/** Python's range(start, stop, step) for a positive step. */
function range(start, stop, step = 1) {
    const out = [];
    for (let i = start; i < stop; i += step) out.push(i);
    return out;
}

const sameWindow = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
const hasWindow = (list, w) => list.some((x) => sameWindow(x, w));

/** Problems with these settings, as messages (empty when valid); frameLimit: the motion model's, if known. */
export function validate(options, frameLimit = null) {
    const problems = [];
    const { context_length: length, context_overlap: overlap, context_stride: stride } = options;
    if (!(length >= 1)) problems.push(`context_length must be at least 1 (is ${length})`);
    if (!(overlap >= 0 && overlap < length)) {
        problems.push(`context_overlap must be less than context_length (${overlap} >= ${length})`);
    }
    if (!(stride >= 1)) problems.push(`context_stride must be at least 1 (is ${stride})`);
    if (frameLimit && length > frameLimit && !options.stretch_pe) {
        problems.push(`context_length ${length} is above the motion model's ${frameLimit}-frame limit`);
    }
    if (!SCHEDULES.includes(options.schedule)) problems.push(`unknown schedule ${options.schedule}`);
    if (!FUSE_METHODS.includes(options.fuse_method)) problems.push(`unknown fuse method ${options.fuse_method}`);
    return problems;
}

function dilations(frames, o) {
    return range(0, o.context_stride).map((k) => 2 ** k)
        .filter((d) => (o.context_length - 1) * d + 1 <= frames);
}

function staticWindows(frames, o, offset = 0, dilation = 1) {
    const span = (o.context_length - 1) * dilation + 1;
    const advance = (o.context_length - o.context_overlap) * dilation;
    const starts = [...new Set([0, ...range(offset, frames - span, advance), frames - span])].sort((a, b) => a - b);
    return starts.map((start) => range(start, start + span, dilation));
}

function uniformLevels(frames, o) {
    return Math.min(o.context_stride, Math.ceil(Math.log2(frames / o.context_length)) + 1);
}

const SCHEDULE_FUNCTIONS = {
    standard_static: (frames, o) => staticWindows(frames, o),

    standard_uniform(frames, o, step) {
        const shift = orderedHalving(step), L = o.context_length;
        const windows = [];
        for (let level = 0; level < uniformLevels(frames, o); level++) {
            const dilation = 1 << level;
            if ((L - 1) * dilation + 1 > frames) break;
            const first = Math.trunc(shift * dilation) + Math.trunc(roundHalfEven(frames * shift));
            const advance = L * dilation - o.context_overlap;
            for (const start of range(first, frames + Math.trunc(roundHalfEven(frames * shift)) - o.context_overlap, advance)) {
                windows.push(range(0, L).map((i) => (start + i * dilation) % frames));
            }
        }
        const kept = [];
        for (let index = 0; index < windows.length; index++) {
            const window = windows[index];
            let wrap = null;
            for (let i = 1; i < window.length; i++) {
                if (window[i] < window[i - 1]) { wrap = i; break; }
            }
            if (wrap !== null) {
                const wrapped = window[wrap];
                const relative = window.map((f) => (((f - window[0]) % frames) + frames) % frames);
                const last = relative[relative.length - 1];
                window.splice(0, window.length, ...relative.map((f) => f + frames - 1 - last));
                if (!windows[(index + 1) % windows.length].includes(wrapped)) {
                    windows.splice(index + 1, 0, range(wrapped, wrapped + L));
                }
            }
            if (!hasWindow(windows.slice(0, index), window)) kept.push(window);
        }
        return kept;
    },

    shifted_static(frames, o, step) {
        const windows = [];
        for (const dilation of dilations(frames, o)) {
            const advance = (o.context_length - o.context_overlap) * dilation;
            const offset = Math.trunc(orderedHalving(step) * advance);
            for (const w of staticWindows(frames, o, offset, dilation)) {
                if (!hasWindow(windows, w)) windows.push(w);
            }
        }
        return windows;
    },

    looped_uniform(frames, o, step) {
        const windows = [];
        for (const dilation of dilations(frames, o)) {
            const advance = (o.context_length - o.context_overlap) * dilation;
            const offset = Math.trunc(roundHalfEven(orderedHalving(step) * frames));
            const end = offset + frames - (o.closed_loop ? 0 : o.context_overlap * dilation);
            for (const start of range(offset, Math.max(end, offset + 1), advance)) {
                const w = range(0, o.context_length).map((i) => (start + i * dilation) % frames);
                if (!hasWindow(windows, w)) windows.push(w);
            }
        }
        return windows;
    },

    batched: (frames, o) => range(0, frames, o.context_length)
        .map((start) => range(start, Math.min(start + o.context_length, frames))),
};

/** The windows of one sampling step (one window for clips of at most context_length frames). */
export function contextWindows(frames, options, step = 0) {
    if (frames <= options.context_length) return [range(0, frames)];
    return SCHEDULE_FUNCTIONS[options.schedule](frames, options, step);
}

const FUSE_FUNCTIONS = {
    flat: (w) => w.map(() => 1.0),
    pyramid: (w) => w.map((_, i) => Math.min(i + 1, w.length - i)),
    "overlap-linear"(w, frames, o) {
        const n = w.length, overlap = Math.min(o.context_overlap, Math.floor(n / 2));
        const weights = w.map(() => 1.0);
        const ramp = range(0, overlap).map((k) => (k + 1) / (overlap + 1));
        if (w[0] !== 0) ramp.forEach((v, k) => { weights[k] = v; });
        if (w[n - 1] !== frames - 1) ramp.slice().reverse().forEach((v, k) => { weights[n - overlap + k] = v; });
        return weights;
    },
    gaussian(w) {
        const n = w.length, centre = (n - 1) / 2, sigma = Math.max(n / 4, 0.5);
        return w.map((_, i) => Math.exp(-((i - centre) ** 2) / (2 * sigma ** 2)));
    },
    delayed_reverse_sawtooth(w) {
        const n = w.length, mid = Math.floor((n + 1) / 2);
        const head = [...Array(mid - 1).fill(0.01), ...(n % 2 === 0 ? [mid] : [])];
        return [...head, ...range(0, mid).map((k) => mid - k)];
    },
};

/** One weight per position of ``window``. */
export function fuseWeights(window, frames, options) {
    return FUSE_FUNCTIONS[options.fuse_method](window, frames, options);
}
