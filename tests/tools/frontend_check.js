// Load UI workflows into the real ComfyUI frontend (headless Chromium), one after the other in one page
// (the frontend and the pack's extension boot once), and write what each shows: a screenshot, the API
// graph the frontend itself produces (app.graphToPrompt) and the console's errors and warnings: those
// of the boot (the pack's extension loading) and those logged while that workflow was loaded.
// Driven by frontend_check.py (and so by tests/test_frontend.py).
// Usage: node frontend_check.js URL JOBS.json, JOBS = [{workflow, png, json, command?}, ...]; with a
// command, the page's text before and after running it is written too.
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, jobsPath] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.ADS_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run', '--disable-quic']});
  try {
    await showAll(browser, url, JSON.parse(fs.readFileSync(jobsPath)));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });

const reported = l => l.type === 'error' || l.type === 'pageerror' || l.type === 'warning';

async function showAll(browser, url, jobs) {
  const page = await browser.newPage({viewport: {width: 1900, height: 1000}});
  let logs = [];
  page.on('console', m => logs.push({type: m.type(), text: m.text()}));
  page.on('pageerror', e => logs.push({type: 'pageerror', text: String(e && e.stack || e)}));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.graph.nodes, null, {timeout: 90000});
  await page.waitForTimeout(3000);
  // a first boot opens the template browser over the canvas: close it, or every screenshot shows it
  await page.keyboard.press('Escape');
  await page.waitForTimeout(500);
  const boot = logs.filter(reported);
  for (const job of jobs) {
    logs = [];
    const wf = JSON.parse(fs.readFileSync(job.workflow));
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
    await page.waitForTimeout(2500);
    let before = null;
    if (job.command) {  // a command of the pack's extension, run on the loaded workflow
      before = await page.evaluate(() => document.body.innerText);
      await page.keyboard.press('Escape');  // the missing-nodes dialog of a workflow with foreign nodes
      await page.waitForTimeout(300);
      await page.evaluate(async (c) => { await window.app.extensionManager.command.execute(c); }, job.command);
      await page.waitForTimeout(2500);
    }
    const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const missing = await page.evaluate(() => window.app.graph.nodes.filter(n => n.has_errors || n.type === undefined)
      .map(n => n.type));
    await page.screenshot({path: job.png});
    const after = job.command ? await page.evaluate(() => document.body.innerText) : null;
    fs.writeFileSync(job.json, JSON.stringify({prompt, missing, console: [...boot, ...logs.filter(reported)],
                                               before, after}));
  }
  await page.close();
}
