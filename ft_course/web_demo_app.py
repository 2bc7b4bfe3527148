"""The streamlit page behind `ft-course web-demo` (package data, not an nbdev module; see nbs/11_chat.ipynb).

Run through `ft-course web-demo MODEL [--adapter DIR] [--port P] [--tools calculator,lookup]`, which calls
`streamlit run web_demo_app.py -- MODEL ...` bound to 127.0.0.1. Streamlit re-runs this file top to bottom on
every interaction: the model is loaded once per server (`st.cache_resource`), the conversation lives in
`st.session_state` (one per browser tab), and the reply streams into the page through `st.write_stream`.
With `--tools` each question goes through the agent loop (`ft_course.chat.ToolSession`): every tool call shows as an
expander labelled `🔧 name(args) → result` in the assistant's message, before the answer.

Test hook: with `--tools`, the environment variable FT_COURSE_DEMO_REPLIES=FILE (a JSON list of strings) makes those
replies stand in for the model's, in order (`ft_course.chat.scripted_generate`); the tools still run for real, and the
page says so in a warning. tests/test_chat.py uses it, since the base model does not call tools.
"""
import json, os, re, sys, threading
import streamlit as st
from ft_course.chat import chat_parser, load_chat_model, make_session, make_tool_session, scripted_generate, call_text

args = chat_parser('ft-course web-demo').parse_args(sys.argv[1:])
SCRIPT = os.environ.get('FT_COURSE_DEMO_REPLIES') if args.tools else None

@st.cache_resource(show_spinner='loading the model ...')
def _load(model, adapter, bits, script):
    m, tok, info = load_chat_model(model, adapter, bits=bits)
    gen = scripted_generate(json.loads(open(script, encoding='utf-8').read())) if script else None
    return m, tok, info, threading.Lock(), gen   # one generation at a time: tabs share the model (and the script)

model, tok, info, lock, scripted = _load(args.model, args.adapter, args.bits, SCRIPT)

st.set_page_config(page_title='ft_course chat', page_icon='💬')
st.title('ft_course chat')
st.caption(f"model: `{args.model}`" + (f" + adapter `{args.adapter}`" if args.adapter else '') +
           (f" · tools: {', '.join(args.tools.split(','))} ({args.tool_format} calls, at most {args.max_tool_calls} per question)" if args.tools else ''))
if SCRIPT: st.warning(f"scripted replies from {SCRIPT} stand in for the model (FT_COURSE_DEMO_REPLIES); the tools run for real")
if 'messages' not in st.session_state: st.session_state.messages = []

with st.sidebar:
    if not args.tools:   # the agent loop decodes greedily with its own system prompt (the tools' signatures)
        system = st.text_area('system prompt', value=args.system or info.get('system') or '')
        temperature = st.slider('temperature', 0.0, 1.5, float(args.temperature), 0.05)
        top_p = st.slider('top-p', 0.05, 1.0, float(args.top_p), 0.05)
    max_new = st.number_input('max new tokens', 1, 4096, int(args.max_new_tokens))
    if st.button('Reset', key='reset', type='primary'):
        st.session_state.messages = []

def _md(text):
    "`text` with markdown's punctuation escaped (an expander's label is markdown: 2*3*4 must not turn italic)."
    return re.sub(r'([\\`*_{}\[\]()<>#+\-.!|~$])', r'\\\1', text)

def show_call(m):
    with st.expander(_md(call_text(m))):
        st.code(json.dumps(m.get('arguments'), ensure_ascii=False) if m.get('name') else m.get('reply', ''), language='json')
        if m.get('ok'): st.success(m['content'])
        else: st.error(m['content'])

box = None
for msg in st.session_state.messages:   # one assistant message holds a question's tool calls and its answer
    if msg['role'] == 'user':
        box = None
        with st.chat_message('user'): st.markdown(msg['content'])
        continue
    box = box or st.chat_message('assistant')
    with box:   # statements, not a conditional expression: streamlit's "magic" would st.write an expression's value
        if msg['role'] == 'tool': show_call(msg)
        else: st.markdown(msg['content'])

if prompt := st.chat_input('Ask me something'):
    with st.chat_message('user'): st.markdown(prompt)
    history = st.session_state.messages
    with st.chat_message('assistant'):
        if args.tools:
            sess = make_tool_session(model, tok, info, args.tools, args.prompt_template, fmt=args.tool_format,
                                     max_calls=args.max_tool_calls, max_new_tokens=int(max_new), generate_fn=scripted, history=history)
            with lock, st.spinner('thinking ...'): answer = sess.ask(prompt, on_step=show_call)
            st.markdown(answer)
        else:
            sess = make_session(model, tok, info, args.prompt_template, system or None, max_new_tokens=int(max_new),
                                temperature=temperature, top_p=top_p, history=history, seed=args.seed)
            with lock: st.write_stream(sess.stream(prompt))
    st.session_state.messages = sess.history
