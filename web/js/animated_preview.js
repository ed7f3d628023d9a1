// AnimateDiff Suite: the settings of the animated sampling preview (Settings > AnimateDiff Suite).
// While an animated MODEL samples, the server plays the frames of the current window as the sampler
// node's preview (nodes/animated_preview.py); these settings turn that off or set its frame rate for
// this browser. They are sent to the server with this tab's client id, and again whenever the id
// changes (a reconnect). No node is touched.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ENABLED = "AnimateDiffSuite.AnimatedPreview.Enabled";
const FPS = "AnimateDiffSuite.AnimatedPreview.Fps";
const ROUTE = "/animatediff_suite/preview_settings";

let sentFor = null;

function setting(id, fallback) {
    const value = app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id);
    return value ?? fallback;
}

async function push() {
    const clientId = api.clientId;
    if (!clientId) {
        return; // not connected yet: the next status message sends it
    }
    sentFor = clientId;
    const body = { client_id: clientId, enabled: Boolean(setting(ENABLED, true)), fps: Number(setting(FPS, 8)) };
    const response = await api.fetchApi(ROUTE, { method: "POST", body: JSON.stringify(body) });
    if (!response.ok) {
        console.warn(`AnimateDiff Suite: the animated preview setting was refused: ${await response.text()}`);
    }
}

app.registerExtension({
    name: "AnimateDiffSuite.AnimatedPreview",
    settings: [
        {
            id: ENABLED,
            category: ["AnimateDiff Suite", "Sampling preview", "Animated"],
            name: "Animated sampling preview",
            tooltip: "While a motion model samples, the sampler's preview plays the frames of the current " +
                "window in a loop (needs ComfyUI's previews on: --preview-method auto, latent2rgb or taesd).",
            type: "boolean",
            defaultValue: true,
            onChange: () => push(),
        },
        {
            id: FPS,
            category: ["AnimateDiff Suite", "Sampling preview", "Frame rate"],
            name: "Animated preview frame rate (frames per second)",
            type: "slider",
            attrs: { min: 1, max: 30, step: 1 },
            defaultValue: 8,
            onChange: () => push(),
        },
    ],
    async setup() {
        api.addEventListener("status", () => {
            if (api.clientId && api.clientId !== sentFor) {
                push();
            }
        });
        await push();
    },
});
