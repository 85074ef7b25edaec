// Drive speedscope in headless Chromium (Playwright, the system's Chromium) and save what it
// parsed: speedscope's own "Export" (its file format: per thread, the open/close of every
// frame), optionally a screenshot of its time-order view.
//   node speedscope.cjs URL EXPORT_JSON [SCREENSHOT_PNG]
// Env: CHROMIUM (the browser binary), USER_DATA_DIR (a fresh directory), NODE_PATH (where
// playwright-core is installed). Exits non-zero, with the reason, on any page error.
const { launch } = require("./browser.cjs");

const [url, exportPath, screenshotPath] = process.argv.slice(2);
(async () => {
  const context = await launch({ viewport: { width: 1400, height: 800 } });
  const errors = [];
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(30000);
    // speedscope's Export hands a Blob to URL.createObjectURL for an <a download>: keep it,
    // and read it back here (no download machinery, no file picker).
    await page.addInitScript(() => {
      const create = URL.createObjectURL;
      URL.createObjectURL = (blob) => {
        window.__exported = blob;
        return create.call(URL, blob);
      };
    });
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("dialog", (d) => { errors.push("dialog: " + d.message()); d.dismiss(); });
    await page.goto(url);
    // Loaded: the profile selector names a thread (speedscope titles it "... (tid N)").
    await page.waitForFunction(() => /\(tid \d+\)/.test(document.body.innerText));
    if (errors.length) throw new Error(errors.join("\n"));
    await page.getByText(/^\W*Export$/).click();
    await page.waitForFunction(() => window.__exported !== undefined);
    const text = await page.evaluate(() => window.__exported.text());
    require("fs").writeFileSync(exportPath, text);
    if (screenshotPath) {
      await page.waitForTimeout(500); // let the WebGL flame chart paint
      await page.screenshot({ path: screenshotPath, clip: { x: 0, y: 0, width: 1400, height: 320 } });
    }
    if (errors.length) throw new Error(errors.join("\n"));
  } finally {
    await context.close();
  }
})().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
