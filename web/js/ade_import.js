// AnimateDiff Suite: convert the open workflow's AnimateDiff-Evolved nodes to this pack's
// (menu Extensions > AnimateDiff Suite, or the toast shown when a loaded workflow needs ADE's nodes).
// The mapping runs on the server (nodes/ade_import.py), the same code as `python <pack> import-ade`.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COMMAND = "AnimateDiffSuite.ConvertADEWorkflow";

function notify(severity, summary, detail) {
    const toast = app.extensionManager?.toast;
    if (toast?.add) {
        toast.add({ severity, summary, detail, life: severity === "error" ? undefined : 8000 });
    } else {
        console.log(`[AnimateDiff Suite] ${summary}: ${detail}`);
    }
}

export async function convertADEWorkflow() {
    const response = await api.fetchApi("/animatediff_suite/import_ade", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ workflow: app.graph.serialize() }),
    });
    const result = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok || result.error) {
        notify("error", "AnimateDiff-Evolved import failed", result.error ?? response.statusText);
        return result;
    }
    await app.loadGraphData(result.workflow, true, true, null, { showMissingNodesDialog: false });
    const notMapped = result.report.filter((line) => line.startsWith("node not mapped")).length;
    notify(notMapped ? "warn" : "success", `${result.mapped} AnimateDiff-Evolved node(s) converted`,
        result.report.length
            ? `${notMapped} node(s) not mapped; the Note node "Imported from AnimateDiff-Evolved" lists every ` +
              "node and option that was not mapped or was approximated."
            : "Everything was mapped exactly.");
    return result;
}

app.registerExtension({
    name: "AnimateDiffSuite.ImportADE",
    commands: [{
        id: COMMAND,
        label: "Convert AnimateDiff-Evolved workflow to AnimateDiff Suite",
        function: convertADEWorkflow,
    }],
    menuCommands: [{ path: ["Extensions", "AnimateDiff Suite"], commands: [COMMAND] }],
    async afterConfigureGraph(missingNodeTypes) {
        const names = (missingNodeTypes ?? []).map((t) => (typeof t === "string" ? t : t?.type ?? ""));
        if (names.some((name) => name.startsWith("ADE_"))) {
            notify("info", "This workflow uses AnimateDiff-Evolved nodes",
                "Extensions > AnimateDiff Suite > Convert AnimateDiff-Evolved workflow maps them to this pack.");
        }
    },
});
