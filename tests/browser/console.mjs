// Drives castellum's admin console in Debian's headless Chromium: sign in, see the CA cells,
// park a CA with its button (accepting the confirmation), see its state change, take a
// screenshot. Usage: node console.mjs ADMIN_URL TOKEN SCREENSHOT CA
import { chromium } from "playwright-core";

const [, , base, token, screenshot, ca] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1500 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (dialog) => dialog.accept());
  await page.goto(`${base}/admin`);
  await page.fill("#token", token);
  await page.click("#sign-in");
  await page.waitForSelector(`.cell[data-ca="${ca}"]`, { timeout: 10000 });
  const cells = await page.locator(".cell").count();
  const before = await page.textContent(`.cell[data-ca="${ca}"] [data-field="state"]`);
  await page.click(`button[data-action="park"][data-ca="${ca}"]`);
  await page.waitForFunction(
    (ca) => document.querySelector(`.cell[data-ca="${ca}"] [data-field="state"]`)?.textContent === "parked",
    ca, { timeout: 10000 });
  await page.waitForTimeout(1200); // one more refresh, so the screenshot shows a settled page
  await page.screenshot({ path: screenshot, fullPage: true });
  // What the page shows, read back from it: the test compares it with the engine's state.
  const after = await page.textContent(`.cell[data-ca="${ca}"] [data-field="state"]`);
  const shown = await page.$$eval(".cell", (nodes) => nodes.map((n) => ({
    ca: n.dataset.ca, state: n.querySelector('[data-field="state"]')?.textContent })));
  const meta = await page.textContent("#meta");
  const store = await page.textContent("#store");
  const audit = await page.$$eval("#audit tr", (rows) => rows.slice(0, 5).map((r) =>
    [...r.querySelectorAll("td")].map((td) => td.textContent)));
  const profiles = await page.$$eval("#profiles tr", (rows) => rows.map((r) =>
    [r.cells[0]?.textContent, r.cells[1]?.textContent]));
  console.log(JSON.stringify({ cells, shown, before, after, meta, store, audit, profiles, errors }));
  if (errors.length) process.exitCode = 1;
} finally {
  await browser.close();
}
