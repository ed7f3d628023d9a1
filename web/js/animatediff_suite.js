// AnimateDiff Suite: show what Load Motion Model loaded (family, version, frame limit) on the node.
// Chains the original onExecuted and only touches this pack's nodes (ids prefixed "ADS_").
import { app } from "../../scripts/app.js";

const INFO_WIDGET = "loaded";

app.registerExtension({
    name: "AnimateDiffSuite.LoadedInfo",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("ADS_LoadMotionModel")) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            const text = message?.text?.join("\n");
            if (text) {
                let widget = this.widgets?.find((w) => w.name === INFO_WIDGET);
                if (!widget) {
                    widget = this.addWidget("text", INFO_WIDGET, "", () => {}, { serialize: false });
                    widget.serialize = false; // never saved into widgets_values
                    widget.disabled = true;
                }
                widget.value = text;
                this.setDirtySize?.();
                app.graph.setDirtyCanvas(true, false);
            }
            return result;
        };
    },
});
