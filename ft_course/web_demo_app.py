"""The streamlit page behind `ft-course web-demo` (package data, not an nbdev module; see nbs/11_chat.ipynb).

Run through `ft-course web-demo MODEL [--adapter DIR] [--port P]`, which calls
`streamlit run web_demo_app.py -- MODEL ...` bound to 127.0.0.1. Streamlit re-runs this file top to bottom on
every interaction: the model is loaded once per server (`st.cache_resource`), the conversation lives in
`st.session_state` (one per browser tab), and the reply streams into the page through `st.write_stream`.
"""
import sys, threading
import streamlit as st
from ft_course.chat import chat_parser, load_chat_model, make_session

args = chat_parser('ft-course web-demo').parse_args(sys.argv[1:])

@st.cache_resource(show_spinner='loading the model ...')
def _load(model, adapter, bits):
    m, tok, info = load_chat_model(model, adapter, bits=bits)
    return m, tok, info, threading.Lock()   # one generation at a time: tabs share the model

model, tok, info, lock = _load(args.model, args.adapter, args.bits)

st.set_page_config(page_title='ft_course chat', page_icon='💬')
st.title('ft_course chat')
st.caption(f"model: `{args.model}`" + (f" + adapter `{args.adapter}`" if args.adapter else ''))
if 'messages' not in st.session_state: st.session_state.messages = []

with st.sidebar:
    system = st.text_area('system prompt', value=args.system or info.get('system') or '')
    temperature = st.slider('temperature', 0.0, 1.5, float(args.temperature), 0.05)
    top_p = st.slider('top-p', 0.05, 1.0, float(args.top_p), 0.05)
    max_new = st.number_input('max new tokens', 1, 4096, int(args.max_new_tokens))
    if st.button('Reset', key='reset', type='primary'):
        st.session_state.messages = []

for msg in st.session_state.messages:
    with st.chat_message(msg['role']): st.markdown(msg['content'])

if prompt := st.chat_input('Ask me something'):
    with st.chat_message('user'): st.markdown(prompt)
    sess = make_session(model, tok, info, args.prompt_template, system or None, max_new_tokens=int(max_new),
                        temperature=temperature, top_p=top_p, history=st.session_state.messages, seed=args.seed)
    with st.chat_message('assistant'):
        with lock: st.write_stream(sess.stream(prompt))
    st.session_state.messages = sess.history
