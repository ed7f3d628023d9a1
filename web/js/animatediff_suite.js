// AnimateDiff Suite: show what Load Motion Model loaded (family, version, modules, frame limit) and the
// beta schedule Apply Motion Model chose (auto resolved) on the node, once it ran.
// Chains the original onExecuted and only touches this pack's nodes (ids prefixed "ADS_").
import { app } from "../../scripts/app.js";

const INFO_WIDGETS = { ADS_LoadMotionModel: "loaded", ADS_ApplyMotionModel: "chosen" };

app.registerExtension({
    name: "AnimateDiffSuite.LoadedInfo",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        const INFO_WIDGET = INFO_WIDGETS[nodeData?.name];
        if (!INFO_WIDGET) {
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
