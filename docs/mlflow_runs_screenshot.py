import sys
from playwright.sync_api import sync_playwright
url, out = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    pg = b.new_page(viewport={"width": 1700, "height": 1000})
    pg.goto(url)
    pg.wait_for_timeout(5000)
    try:  # the assistant side panel takes a third of the screen
        pg.locator("button[aria-label='Close']").last.click(timeout=2000)
    except Exception as e:
        print("no close", e)
    pg.get_by_role("button", name="Columns", exact=True).click()
    pg.wait_for_timeout(800)
    dlg = pg.get_by_role("dialog")
    for name in ("Dataset", "Source", "Models"):
        dlg.get_by_text(name, exact=True).first.click()
        pg.wait_for_timeout(200)
    search = pg.get_by_placeholder("Search columns")
    for col in ("mean_iou", "mean_iou_se", "iou_bone", "iou_degradation_layer", "iou_residual_material", "flops", "params"):
        search.fill(col)
        pg.wait_for_timeout(500)
        dlg.get_by_text(col, exact=True).first.click()
        pg.wait_for_timeout(200)
    pg.keyboard.press("Escape")
    pg.wait_for_timeout(1500)
    # expand the two best configs to show their folds nested under them
    expanders = pg.locator("button[data-component-id*='runnamecellrenderer']")
    print("expanders", expanders.count())
    for i in range(min(2, expanders.count())):
        expanders.nth(i).click()
        pg.wait_for_timeout(500)
    pg.wait_for_timeout(1500)
    pg.screenshot(path=out)
    print(pg.locator("body").inner_text()[:1500])
    b.close()
