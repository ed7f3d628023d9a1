// AnimateDiff Suite: show what Load Motion Model / Load SparseCtrl loaded (family or kind, version, modules, frame limit,
// norm, SHA-256 prefix) and the beta schedule Apply Motion Model chose (auto resolved) on the node, once
// it ran, as read-only selectable text (the hash can be copied and compared with a download page).
// Chains the original onExecuted and only touches this pack's nodes (ids prefixed "ADS_").
import { app } from "../../scripts/app.js";

const INFO_WIDGETS = { ADS_LoadMotionModel: "loaded", ADS_LoadSparseCtrl: "loaded", ADS_ApplyMotionModel: "chosen" };

function infoWidget(node, name) {
    const existing = node.widgets?.find((w) => w.name === name);
    if (existing) {
        return existing;
    }
    const element = document.createElement("div");
    element.className = "ads-info";
    Object.assign(element.style, {
        font: "11px monospace", color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
        padding: "3px 6px", borderRadius: "4px", whiteSpace: "pre-wrap", wordBreak: "break-all",
        userSelect: "text", overflow: "auto", boxSizing: "border-box",
    });
    let value = "";
    const widget = node.addDOMWidget(name, "ads_info", element, {
        serialize: false, // never saved into widgets_values nor sent with the prompt
        getValue: () => value,
        setValue: (text) => {
            value = text;
            element.textContent = text.split(", ").join("\n"); // one fact per line
        },
        getMinHeight: () => 10 + 14 * Math.max(1, element.textContent.split("\n").length),
    });
    widget.serialize = false;
    return widget;
}

app.registerExtension({
    name: "AnimateDiffSuite.LoadedInfo",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        const name = INFO_WIDGETS[nodeData?.name];
        if (!name) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            const text = message?.text?.join("\n");
            if (text) {
                infoWidget(this, name).value = text;
                this.setSize?.([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
                app.graph.setDirtyCanvas(true, false);
            }
            return result;
        };
    },
});
