from hypothesis import given, strategies as st
from PIL import Image

from ovis25.grounding import Box, draw_grounding, format_box, format_boxes, format_point, parse_boxes, parse_points, \
    parse_refs

coord = st.floats(min_value=0, max_value=0.999, allow_nan=False)


def test_parse_model_card_format():
    text = "The <ref>red triangle</ref> is at <box>(0.120,0.305),(0.481,0.770)</box>."
    assert parse_refs(text) == ["red triangle"]
    assert parse_boxes(text) == [Box(0.12, 0.305, 0.481, 0.77)]
    many = "[<box>(0.1,0.2),(0.3,0.4)</box>,<box>(0.5,0.6),(0.7,0.8)</box>]"
    assert [b.x1 for b in parse_boxes(many)] == [0.1, 0.5]
    assert parse_points("<point>(0.250,0.750)</point>")[0].to_pixels(200, 100) == (50.0, 75.0)


def test_malformed_boxes_are_ignored_and_corners_sorted():
    assert parse_boxes("<box>(0.1,0.2)</box> <box>(a,b),(c,d)</box>") == []
    assert parse_boxes("<box>(0.5,0.6),(0.1,0.2)</box>") == [Box(0.1, 0.2, 0.5, 0.6)]


@given(coord, coord, coord, coord)
def test_format_parse_round_trip(a, b, c, d):
    box = Box(min(a, c), min(b, d), max(a, c), max(b, d))
    (back,) = parse_boxes(format_box(box))
    assert abs(back.x1 - box.x1) <= 5e-4 and abs(back.y2 - box.y2) <= 5e-4


def test_pixel_conversion_and_iou():
    text = format_box((20, 10, 60, 50), width=200, height=100)
    assert text == "<box>(0.100,0.100),(0.300,0.500)</box>"
    (box,) = parse_boxes(text)
    assert box.to_pixels(200, 100) == (20.0, 10.0, 60.0, 50.0)
    assert box.iou(box) == 1.0
    assert box.iou(Box(0.5, 0.5, 0.9, 0.9)) == 0.0
    assert abs(Box(0, 0, 0.2, 0.2).iou(Box(0.1, 0, 0.3, 0.2)) - 1 / 3) < 1e-9
    assert format_point(50, 25, 100, 100) == "<point>(0.500,0.250)</point>"
    assert format_boxes([box, box]).startswith("[<box>")


def test_draw_marks_box_outline():
    img = Image.new("RGB", (100, 80), "white")
    out = draw_grounding(img, "<box>(0.2,0.25),(0.6,0.75)</box>", color="red", width=2)
    assert out.getpixel((20, 40)) == (255, 0, 0)        # left edge
    assert out.getpixel((40, 40)) == (255, 255, 255)    # inside stays untouched
    assert img.getpixel((20, 40)) == (255, 255, 255)    # original not modified
